"""FIDO2 benchmark, run by hand (never in CI): `python bench/bench_fido.py [--pcsc]`.

Assertions per second through `Keystore.sign` (catalog lookup, usage check, client data
JSON, getAssertion, the CBOR assertion structure, the audit line) against python-fido2's
`Ctap2.get_assertion` called directly, on the same software authenticator
(tests/emulators/fido_authenticator.py) and the same credential, interleaved so machine noise hits
both alike. The authenticator is touched at once. Target: Keystore at most 1.3x slower.

With `--pcsc` the same comparison also runs through pcscd and vpcd (`device = "pcsc"`
against `CtapPcscDevice`); that needs root or a running pcscd with vpcd.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "emulators"))

from fido2.ctap import CtapDevice
from fido2.ctap2 import Ctap2
from fido_authenticator import (
    FIDO_PIN_ENV,
    FIDO_VAULT_PASS,
    FIDO_VAULT_PASS_ENV,
    FidoCard,
    SoftAuthenticator,
    SoftCtapDevice,
    open_with_authenticator,
    write_fido_config,
)

import strongroom
from strongroom.backends.fido.assertion import Assertion


def per_op(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def compare(ks: strongroom.Keystore, device: CtapDevice, rounds: int, n: int) -> dict[str, float]:
    ks.generate("bench", "fido-es256", backend="fido")
    message = os.urandom(64)
    signature = ks.sign("bench", message)
    ks.verify("bench", message, signature)
    credential = Assertion.decode(signature).credential_id
    ctap = Ctap2(device)
    allow = [{"type": "public-key", "id": credential}]
    client_data_hash = os.urandom(32)
    ctap.get_assertion("strongroom.local", client_data_hash, allow)
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(per_op(lambda: ks.sign("bench", message), n))
        theirs.append(
            per_op(lambda: ctap.get_assertion("strongroom.local", client_data_hash, allow), n)
        )
    a, b = statistics.median(ours), statistics.median(theirs)
    return {"keystore_us": a, "ctap2_us": b, "ratio": a / b}


@contextlib.contextmanager
def keystore(
    tmp: Path, device: str, authenticator: SoftAuthenticator | None = None
) -> Iterator[strongroom.Keystore]:
    """A keystore on `device`, or with `authenticator` passed in as its fido device."""
    os.environ[FIDO_VAULT_PASS_ENV] = FIDO_VAULT_PASS
    os.environ.pop(FIDO_PIN_ENV, None)
    config = write_fido_config(tmp / device.replace(":", "-").replace(" ", "_"), device)
    if authenticator is None:
        opened = strongroom.open(config)
    else:
        opened = open_with_authenticator(authenticator, config)
    with opened as ks:
        yield ks


def report(label: str, r: dict[str, float]) -> None:
    print(
        f"| {label} | {r['keystore_us']:.0f} µs ({1e6 / r['keystore_us']:,.0f}/s) "
        f"| {r['ctap2_us']:.0f} µs ({1e6 / r['ctap2_us']:,.0f}/s) | {r['ratio']:.2f}x | ≤ 1.3x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("-n", type=int, default=300, help="assertions per round")
    parser.add_argument("--pcsc", action="store_true", help="also through pcscd + vpcd")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        authenticator = SoftAuthenticator(tmp / "authenticator.json")
        print("| path | Keystore.sign | Ctap2.get_assertion | ratio | target |")
        print("|---|---|---|---|---|")
        with keystore(tmp, "auto", authenticator) as ks:
            report(
                "in-process CtapDevice",
                compare(ks, SoftCtapDevice(authenticator), args.rounds, args.n),
            )
        if args.pcsc:
            import pcsc_support
            from fido2.pcsc import CtapPcscDevice

            with pcsc_support.ensure_pcscd(tmp) as service:
                card = FidoCard(authenticator)
                with service.serve(card, pcsc_support.FIDO_SLOT) as link:
                    device = next(CtapPcscDevice.list_devices(link.reader.name))
                    with keystore(tmp, f"pcsc:{link.reader.name}") as ks:
                        result = compare(ks, device, args.rounds, max(args.n // 10, 10))
                        report("PC/SC (pcscd + vpcd)", result)
                    device.close(release=True)


if __name__ == "__main__":
    main()
