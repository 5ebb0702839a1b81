"""Test support for the PIV backend: the emulated card in the PIV vpcd slot, and configs.

`PivReader` is what the vpcd slot holds: it forwards to a `PivCard` that tests can swap (a
fresh card per test) and can be pulled out and put back (`remove()` / `insert()`), which
pcscd sees as a real card removal and insertion.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path

import pcsc_support
import pytest
from piv_card import PivCard

PIV_PIN_ENV = "SR_TEST_PIV_PIN"
PIV_MGMT_ENV = "SR_TEST_PIV_MGMT"
PIV_VAULT_PASS_ENV = "SR_TEST_PIV_VAULT_PASS"
PIV_VAULT_PASS = "piv vault passphrase 4b1d"
OPENSC_MODULE = Path("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")


class PivReader:
    """The `VirtualCard` in the PIV slot: forwards to `card`, which tests may replace."""

    def __init__(self, service: pcsc_support.PcscService, card: PivCard) -> None:
        self.service = service
        self.card = card
        self._stack = contextlib.ExitStack()
        self.link: pcsc_support.VpcdLink | None = None

    @property
    def atr(self) -> bytes:
        return self.card.atr

    def power_on(self) -> None:
        self.card.power_on()

    def power_off(self) -> None:
        self.card.power_off()

    def reset(self) -> None:
        self.card.reset()

    def transmit(self, apdu: bytes) -> bytes:
        return self.card.transmit(apdu)

    @property
    def name(self) -> str:
        return self.service.reader(pcsc_support.PIV_SLOT).name

    def insert(self, card: PivCard | None = None) -> None:
        if card is not None:
            self.card = card
        if self.link is None:
            self.link = self._stack.enter_context(self.service.serve(self, pcsc_support.PIV_SLOT))

    def remove(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            error = link.error
            self._stack.close()
            self._stack = contextlib.ExitStack()
            if error is not None:
                raise error
            _wait_until_absent(self.name)

    def drop_dead_link(self) -> None:
        """Forget a link whose pcscd died (its error is the expected ConnectionError)."""
        link, self.link = self.link, None
        if link is not None:
            link.error = None
            self._stack.close()
            self._stack = contextlib.ExitStack()

    def check(self) -> None:
        if self.link is not None and self.link.error is not None:
            raise self.link.error


def _wait_until_absent(reader_name: str, timeout: float = 10.0) -> None:
    import time

    from smartcard import scard

    rc, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc, states = scard.SCardGetStatusChange(
                ctx, 100, [(reader_name, scard.SCARD_STATE_UNAWARE)]
            )
            if rc == scard.SCARD_S_SUCCESS and states and states[0][1] & scard.SCARD_STATE_EMPTY:
                return
            time.sleep(0.02)
        raise TimeoutError(f"pcscd still sees a card in {reader_name!r}")
    finally:
        scard.SCardReleaseContext(ctx)


# -- fixtures shared by the PIV test modules (import them so pytest finds them) ---------------
@pytest.fixture(scope="module")
def piv_reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PivReader]:
    workdir = tmp_path_factory.mktemp("pcscd")
    with pcsc_support.ensure_pcscd(workdir) as service:
        reader = PivReader(service, PivCard())
        reader.insert()
        try:
            yield reader
        finally:
            reader.remove()
            gc.collect()  # drop pyscard connections while pcscd still runs


@pytest.fixture
def reader(piv_reader: PivReader) -> Iterator[PivReader]:
    """The reader with a fresh card in it (inserted again if a test pulled it out)."""
    piv_reader.card = PivCard()
    piv_reader.insert()
    yield piv_reader
    piv_reader.check()


def write_piv_config(
    directory: Path, reader: str, *, piv_extra: str = "", order: str = '["piv", "vault"]'
) -> Path:
    """A config with a cheap-KDF vault and a `piv` backend on `reader` (PIN from the env)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "strongroom.toml"
    path.write_text(
        "[keystore]\n"
        f'data_dir = "{directory / "data"}"\n'
        f"order = {order}\n"
        "\n"
        "[backends.vault]\n"
        'type = "vault"\n'
        f'passphrase = "env:{PIV_VAULT_PASS_ENV}"\n'
        "kdf_memory_kib = 8192\n"
        "kdf_iterations = 1\n"
        "\n"
        "[backends.piv]\n"
        'type = "piv"\n'
        f'reader = "{reader}"\n'
        f'pin = "env:{PIV_PIN_ENV}"\n'
        f"{piv_extra}\n",
        encoding="utf-8",
    )
    return path


__all__ = [
    "OPENSC_MODULE",
    "PIV_MGMT_ENV",
    "PIV_PIN_ENV",
    "PIV_VAULT_PASS",
    "PIV_VAULT_PASS_ENV",
    "PivReader",
    "write_piv_config",
]
