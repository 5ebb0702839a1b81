"""PIV benchmark against the emulated card, run by hand (never in CI): `python bench/bench_piv.py`.

Starts pcscd with vpcd readers (tests/emulators/pcsc_support.py) and puts the PIV card emulator
(tests/emulators/piv_card.py) in the PIV slot, then:

1. ECDSA P-256 signing through `Keystore.sign` (catalog lookup, usage check, audit line,
   host SHA-256, GENERAL AUTHENTICATE through pyscard → pcscd → vpcd → card) against raw
   pyscard APDUs to the same card and key in the same run: VERIFY once, then per signature
   host SHA-256 + GENERAL AUTHENTICATE `00 87 11 9A` on a connection of its own. Calls are
   interleaved one by one, each timed; the median per round, then the median of rounds.
   Target: at most 1.2x.
   `PivBackend.sign` alone is timed in the same loop, to tell the backend's share from the
   Keystore's.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "emulators"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("-n", type=int, default=300, help="signatures per round and side")
    parser.add_argument("--audit", default="on", choices=["on", "off"])
    args = parser.parse_args()

    import pcsc_support
    from piv_card import DEFAULT_PIN, PivCard
    from piv_support import PIV_PIN_ENV, PIV_VAULT_PASS, PIV_VAULT_PASS_ENV, write_piv_config
    from smartcard import scard

    import strongroom

    os.environ[PIV_PIN_ENV] = DEFAULT_PIN
    os.environ[PIV_VAULT_PASS_ENV] = PIV_VAULT_PASS
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        card = PivCard()
        with pcsc_support.ensure_pcscd(tmp) as service:
            with service.serve(card, pcsc_support.PIV_SLOT) as link:
                reader = link.reader.name
                config = write_piv_config(tmp / "ks", reader)
                if args.audit == "off":
                    text = config.read_text().replace("[keystore]\n", '[keystore]\naudit = "off"\n')
                    config.write_text(text)
                with strongroom.open(config) as ks:
                    info = ks.generate("bench-p256", "ecdsa-p256", backend="piv")
                    message = os.urandom(64)
                    ks.verify("bench-p256", message, ks.sign("bench-p256", message))
                    backend = ks.backend("piv")

                    rc, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
                    rc, handle, proto = scard.SCardConnect(
                        ctx, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1
                    )
                    assert rc == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(rc)

                    def transmit(apdu: bytes) -> bytes:
                        rc, resp = scard.SCardTransmit(handle, proto, list(apdu))
                        assert rc == scard.SCARD_S_SUCCESS
                        out = bytes(resp)
                        assert out[-2:] == b"\x90\x00", out[-2:].hex()
                        return out[:-2]

                    transmit(bytes.fromhex("00A4040005A000000308"))
                    pin = DEFAULT_PIN.encode().ljust(8, b"\xff")
                    transmit(bytes.fromhex("0020008008") + pin)  # VERIFY once

                    def raw() -> bytes:
                        d = hashlib.sha256(message).digest()
                        template = b"\x82\x00\x81\x20" + d
                        apdu = bytes([0, 0x87, 0x11, 0x9A, len(template) + 2, 0x7C])
                        apdu += bytes([len(template)]) + template + b"\x00"
                        out = transmit(apdu)
                        return out[4:]  # 7C L 82 L sig (short lengths for P-256)

                    def ours() -> bytes:
                        return ks.sign("bench-p256", message)

                    def backend_only() -> bytes:
                        return backend.sign(info, message, None)

                    public = ks.public_key("bench-p256")
                    from cryptography.hazmat.primitives import hashes
                    from cryptography.hazmat.primitives.asymmetric import ec

                    public.verify(raw(), message, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, union-attr]
                    for _ in range(50):
                        raw()
                        ours()
                    clock = time.perf_counter_ns
                    ks_med, raw_med, be_med = [], [], []
                    for _ in range(args.rounds):
                        a, b, c = [], [], []
                        for _ in range(args.n):
                            t0 = clock()
                            ours()
                            t1 = clock()
                            raw()
                            t2 = clock()
                            backend_only()
                            t3 = clock()
                            a.append(t1 - t0)
                            b.append(t2 - t1)
                            c.append(t3 - t2)
                        ks_med.append(statistics.median(a) / 1000)
                        raw_med.append(statistics.median(b) / 1000)
                        be_med.append(statistics.median(c) / 1000)
                    scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
                    scard.SCardReleaseContext(ctx)
                ks_us, raw_us = statistics.median(ks_med), statistics.median(raw_med)
                be_us = statistics.median(be_med)
                print(f"ECDSA P-256 sign on the emulated PIV card (audit {args.audit})")
                print(f"  Keystore.sign        {ks_us:8.1f} us  ({1e6 / ks_us:7.0f}/s)")
                print(f"  PivBackend.sign      {be_us:8.1f} us  ({1e6 / be_us:7.0f}/s)")
                print(f"  raw pyscard APDUs    {raw_us:8.1f} us  ({1e6 / raw_us:7.0f}/s)")
                print(f"  ratio Keystore/raw   {ks_us / raw_us:8.2f}x  (target <= 1.2x)")
                print(f"  ratio backend/raw    {be_us / raw_us:8.2f}x")
                print(f"  APDUs seen by the card: {link.apdus}")
            gc.collect()


if __name__ == "__main__":
    main()
