"""A PKCS#11 application for the tests: python-pkcs11 (a library nobody here wrote) loading
p11-kit-client.so, run as its own process by test_pkcs11server_python.py:

    python p11_client.py SCENARIO TOKEN PIN [ARG...]

with P11_KIT_SERVER_ADDRESS set. It prints one JSON object (bytes as hex) on stdout; a
PKCS#11 error is {"error": "ExceptionName", "args": [...]}. Its own process, so that the
server's thread and the client's blocking calls never share an interpreter.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
CHUNKS = [b"part one, ", b"part two, ", b"and the last part" * 100]
"""A message given in three pieces: C_SignUpdate / C_VerifyUpdate once per piece."""


def multipart(session: Any, name: str) -> dict[str, Any]:
    """Sign in three C_SignUpdate calls (SHA256-RSA-PKCS for an RSA key, SHA256-HMAC for
    a secret), verify in three C_VerifyUpdate calls, and verify a forged one."""
    if name.endswith("hmac"):
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=name)
        signer = verifier = key
        mechanism = Mechanism.SHA256_HMAC
    else:
        signer = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=name)
        verifier = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=name)
        mechanism = Mechanism.SHA256_RSA_PKCS
    signature = signer.sign(iter(CHUNKS), mechanism=mechanism)
    good = verifier.verify(iter(CHUNKS), signature, mechanism=mechanism)
    bad = verifier.verify(iter([*CHUNKS, b"!"]), signature, mechanism=mechanism)
    return {"signature": signature.hex(), "good": good, "bad": bad}


def oaep(session: Any, name: str) -> dict[str, Any]:
    """RSA-OAEP (SHA-256) encrypt with the public key object, decrypt with the private."""
    public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=name)
    private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=name)
    param = (Mechanism.SHA256, MGF.SHA256, None)
    ciphertext = public.encrypt(b"a secret for RSA", mechanism=Mechanism.RSA_PKCS_OAEP,
                                mechanism_param=param)  # fmt: skip
    plain = private.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=param)
    return {"ciphertext": ciphertext.hex(), "plaintext": plain.hex()}


def decrypt_oaep(session: Any, name: str, ciphertext: str) -> dict[str, Any]:
    private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=name)
    param = (Mechanism.SHA256, MGF.SHA256, None)
    plain = private.decrypt(bytes.fromhex(ciphertext), mechanism=Mechanism.RSA_PKCS_OAEP,
                            mechanism_param=param)  # fmt: skip
    return {"plaintext": plain.hex()}


def generate(session: Any, name: str, kind: str) -> dict[str, Any]:
    """C_GenerateKeyPair (EC P-256, RSA-2048) or C_GenerateKey (AES-256) as token objects
    labelled `name`; sign (or, for AES, nothing) with the new key; its public key."""
    if kind == "ec":
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )  # fmt: skip
        public, private = params.generate_keypair(store=True, label=name)
        signature = private.sign(b"\x07" * 32, mechanism=Mechanism.ECDSA)
        return {"point": public[Attribute.EC_POINT].hex(), "signature": signature.hex()}
    if kind == "rsa":
        public, private = session.generate_keypair(KeyType.RSA, 2048, store=True, label=name)
        signature = private.sign(b"message", mechanism=Mechanism.SHA256_RSA_PKCS)
        return {"modulus": public[Attribute.MODULUS].hex(), "signature": signature.hex()}
    key = session.generate_key(KeyType.AES, 256, store=True, label=name)
    return {"value_len": key[Attribute.VALUE_LEN], "sensitive": key[Attribute.SENSITIVE]}


def destroy(session: Any, name: str, klass: str) -> dict[str, Any]:
    """C_DestroyObject on the key's object of class `klass` (private, public, secret)."""
    object_class = {
        "private": ObjectClass.PRIVATE_KEY,
        "public": ObjectClass.PUBLIC_KEY,
        "secret": ObjectClass.SECRET_KEY,
    }[klass]
    session.get_key(object_class=object_class, label=name).destroy()
    left = list(session.get_objects({Attribute.LABEL: name}))
    return {"left": len(left)}


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "multipart": multipart,
    "oaep": oaep,
    "decrypt_oaep": decrypt_oaep,
    "generate": generate,
    "destroy": destroy,
}


def main() -> None:
    scenario, token_label, pin, *args = sys.argv[1:]
    token = pkcs11.lib(MODULE).get_token(token_label=token_label)
    try:
        with token.open(user_pin=pin, rw=True) as session:
            result = SCENARIOS[scenario](session, *args)
    except pkcs11.PKCS11Error as e:
        result = {"error": type(e).__name__, "args": [str(a) for a in e.args]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
