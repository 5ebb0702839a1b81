"""pcscd and vpcd for tests: virtual smart cards that real PC/SC clients find.

There is one pcscd per machine (its socket is `/run/pcscd/pcscd.comm`), so every test that
needs PC/SC shares it. `ensure_pcscd()` uses the one that runs, or starts one as a child
process with a reader.conf of our own (`pcscd --foreground --config DIR`) that declares a
vpcd reader pair, and the last `close()` in the process stops it again, only if this
process started it. Test processes on one machine take turns through a lock file, so two
runs never put cards into the same slot or stop each other's pcscd.

vpcd (Debian `vsmartcard-vpcd`) is a pcscd reader driver that listens on a TCP port per
slot; whoever connects there is the card. Our reader.conf puts channel `0x7D00` on ports
32000 (slot 0, reader "Strongroom vpcd 00 00") and 32001 (slot 1, "Strongroom vpcd 00 01"),
or the next free pair (32002/32003, ...) when a port is still taken. If a pcscd started
elsewhere runs with Debian's packaged config instead, its vpcd readers ("Virtual PCD 00 00"
and "00 01" on 35963/35964) are used.

Slots are shared out by purpose, so several emulators can be on the machine at once:
`FIDO_SLOT` for the FIDO2 authenticator card, `PIV_SLOT` for a PIV card emulator.

A card is any object with the `VirtualCard` shape (an ATR, power on/off/reset, and
`transmit(apdu) → response`). `PcscService.serve(card, slot)` connects it to the slot's
vpcd port and answers vpcd's frames in a thread until the block ends:

    with ensure_pcscd(tmp_dir) as pcsc, pcsc.serve(FidoCard(auth), FIDO_SLOT) as link:
        devices = list(CtapPcscDevice.list_devices(link.reader.name))

The vpcd wire protocol: each frame is a 2-byte big-endian length and a payload. A 1-byte
payload is a control (0 power off, 1 power on, 2 reset, 4 send the ATR); anything else is a
command APDU, answered with one response APDU. `TCP_QUICKACK` is set before every `recv`:
without it each APDU waits about 40 ms for a delayed ACK.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

PCSCD_SOCKET = Path("/run/pcscd/pcscd.comm")
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
OUR_FRIENDLY_NAME = "Strongroom vpcd"
OUR_CHANNELS = (0x7D00, 0x7D02, 0x7D04, 0x7D06)
"""vpcd listens on the channel's port (slot 0) and the next (slot 1): 32000/32001 first.
These are below Linux's ephemeral range (32768-60999), so no client connection of another
program takes them; vpcd binds without SO_REUSEADDR, so even a TIME_WAIT socket on its port
makes pcscd's reader fail. The first pair with no socket at all is used."""
DEBIAN_FRIENDLY_NAME = "Virtual PCD"
DEBIAN_CHANNEL = 0x8C7B  # /etc/reader.conf.d/vpcd as Debian ships it: ports 35963, 35964

FIDO_SLOT = 0
PIV_SLOT = 1

_SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
_CONTROL_OFF, _CONTROL_ON, _CONTROL_RESET, _CONTROL_ATR = 0, 1, 2, 4
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)


class VirtualCard(Protocol):
    """What `serve` needs from a card emulator."""

    atr: bytes

    def power_on(self) -> None: ...

    def power_off(self) -> None: ...

    def reset(self) -> None: ...

    def transmit(self, apdu: bytes) -> bytes: ...


@dataclass(frozen=True)
class VpcdReader:
    """One vpcd slot: the TCP port a card connects to, and the reader name PC/SC shows."""

    port: int
    name: str


def _listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this machine (from /proc/net/tcp{,6}; no probing)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _socket_alive(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _ports_in_use() -> set[int]:
    """Local TCP ports with any socket on them, TIME_WAIT included (vpcd cannot bind those)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 1:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _layout(friendly: str, channel: int) -> list[VpcdReader]:
    return [VpcdReader(channel + slot, f"{friendly} 00 {slot:02X}") for slot in (0, 1)]


class PcscService:
    """The machine's pcscd as this process uses it (shared by every `ensure_pcscd` caller).

    `close()` once per `ensure_pcscd()`; the last one stops pcscd if this process started it
    and lets other test processes have PC/SC again.
    """

    def __init__(
        self, readers: list[VpcdReader], process: subprocess.Popen[bytes] | None, lock_fd: int
    ) -> None:
        self.readers = readers
        self.process = process
        self._lock_fd = lock_fd
        self._users = 0

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def reader(self, slot: int) -> VpcdReader:
        return self.readers[slot]

    @contextlib.contextmanager
    def serve(self, card: VirtualCard, slot: int, timeout: float = 10.0) -> Iterator[VpcdLink]:
        """Insert `card` into vpcd slot `slot` for the length of the block."""
        link = VpcdLink(card, self.reader(slot))
        link.start(timeout)
        try:
            yield link
        finally:
            link.stop()  # the card side closes first, so no TIME_WAIT is left on vpcd's port

    def kill(self) -> None:
        """SIGKILL the pcscd this process started, under whatever clients and cards it has."""
        if self.process is None:
            raise RuntimeError("only a pcscd this process started can be killed")
        self.process.kill()
        self.process.wait(5)

    def start_again(self, workdir: Path, timeout: float = 10.0) -> None:
        """After `kill`: start another pcscd. vpcd's old ports may sit in TIME_WAIT (pcscd's
        side closed first), so the new one takes the next free channel; reader names come
        from FRIENDLYNAME, not the channel, so a config naming the reader keeps working.
        Cards must be inserted again (their links died with the old pcscd)."""
        self.readers, self.process = _find_or_start(workdir, timeout)

    def close(self) -> None:
        global _shared
        with _shared_lock:
            self._users -= 1
            if self._users > 0:
                return
            _shared = None
            process, self.process = self.process, None
            try:
                if process is not None:
                    process.terminate()
                    try:
                        process.wait(5)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(5)
            finally:
                os.close(self._lock_fd)  # releases the machine-wide lock

    def __enter__(self) -> PcscService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared_lock = threading.Lock()
_shared: PcscService | None = None


def ensure_pcscd(workdir: Path, timeout: float = 10.0, wait: float = 300.0) -> PcscService:
    """The pcscd with vpcd readers this process uses: the running one, or one we start.

    Test processes on one machine take turns: the first call in a process waits (up to
    `wait` seconds) for a machine-wide lock that the last `close()` releases, so that two
    test runs never put cards into the same vpcd slot or stop each other's pcscd.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            lock_fd = _machine_lock(wait)
            try:
                readers, process = _find_or_start(workdir, timeout)
            except BaseException:
                os.close(lock_fd)
                raise
            _shared = PcscService(readers, process, lock_fd)
        _shared._users += 1
        return _shared


def _machine_lock(wait: float) -> int:
    path = Path(tempfile.gettempdir()) / "strongroom-pcsc-tests.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(
                    f"another test run has held {path} for {wait:g} s (it uses pcscd/vpcd)"
                ) from None
            time.sleep(0.1)


def _find_or_start(
    workdir: Path, timeout: float
) -> tuple[list[VpcdReader], subprocess.Popen[bytes] | None]:
    if _socket_alive(PCSCD_SOCKET):
        listening = _listening_ports()
        layouts = [(OUR_FRIENDLY_NAME, ch) for ch in OUR_CHANNELS]
        for friendly, channel in [*layouts, (DEBIAN_FRIENDLY_NAME, DEBIAN_CHANNEL)]:
            readers = _layout(friendly, channel)
            if all(r.port in listening for r in readers):
                return readers, None
        raise RuntimeError(
            f"a pcscd is running ({PCSCD_SOCKET}) but no vpcd reader pair listens on the "
            "ports these tests know; stop it so the tests can start their own, or install "
            "vsmartcard-vpcd and restart it"
        )
    pcscd = shutil.which("pcscd", path=_SBIN_PATH)
    if pcscd is None or not VPCD_DRIVER.exists():
        raise RuntimeError(
            "pcscd or the vpcd driver is missing; install the Debian packages pcscd and "
            "vsmartcard-vpcd (scripts/setup.sh does)"
        )
    busy = _ports_in_use()
    channel = next((c for c in OUR_CHANNELS if c not in busy and c + 1 not in busy), None)
    if channel is None:
        raise RuntimeError(f"all vpcd ports the tests may use are busy: {OUR_CHANNELS}")
    conf_dir = workdir / "reader.conf.d"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "strongroom-vpcd").write_text(
        f'FRIENDLYNAME "{OUR_FRIENDLY_NAME}"\n'
        f"DEVICENAME   /dev/null:0x{channel:04X}\n"
        f"LIBPATH      {VPCD_DRIVER}\n"
        f"CHANNELID    0x{channel:04X}\n"
    )
    log_path = workdir / "pcscd.log"
    with open(log_path, "wb") as log:  # pcscd keeps its own descriptor
        process = subprocess.Popen(
            [pcscd, "--foreground", "--config", str(conf_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    readers = _layout(OUR_FRIENDLY_NAME, channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pcscd exited with status {process.returncode}:\n{output}")
        if _socket_alive(PCSCD_SOCKET) and all(r.port in _listening_ports() for r in readers):
            return readers, process
        time.sleep(0.01)
    process.terminate()
    process.wait(5)
    output = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"pcscd's vpcd readers did not come up within {timeout:g} s:\n{output}")


class VpcdLink:
    """A card connected to a vpcd slot, answered from a thread."""

    def __init__(self, card: VirtualCard, reader: VpcdReader) -> None:
        self.card = card
        self.reader = reader
        self.apdus = 0
        self.error: BaseException | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", self.reader.port), timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._thread = threading.Thread(
            target=self._serve, name=f"vpcd-{self.reader.port}", daemon=True
        )
        self._thread.start()
        self._wait_for_card(deadline)

    def _wait_for_card(self, deadline: float) -> None:
        """Until pcscd has noticed the card and can talk to it (it polls every ~400 ms)."""
        from smartcard.Exceptions import CardConnectionException, NoCardException
        from smartcard.System import readers

        while True:
            for reader in readers():
                if str(reader) == self.reader.name:
                    connection = reader.createConnection()
                    try:
                        connection.connect()
                    except (CardConnectionException, NoCardException):
                        break
                    connection.disconnect()
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"pcscd never saw the card in {self.reader.name!r}")
            time.sleep(0.02)

    def _recv_exact(self, n: int) -> bytes:
        sock = self._sock
        assert sock is not None
        out = b""
        while len(out) < n:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("vpcd closed the connection")
            out += chunk
        return out

    def _send(self, payload: bytes) -> None:
        assert self._sock is not None
        self._sock.sendall(len(payload).to_bytes(2, "big") + payload)

    def _serve(self) -> None:
        try:
            while True:
                size = int.from_bytes(self._recv_exact(2), "big")
                payload = self._recv_exact(size)
                if size == 1:
                    control = payload[0]
                    if control == _CONTROL_OFF:
                        self.card.power_off()
                    elif control == _CONTROL_ON:
                        self.card.power_on()
                    elif control == _CONTROL_RESET:
                        self.card.reset()
                    elif control == _CONTROL_ATR:
                        self._send(self.card.atr)
                    continue
                self.apdus += 1
                self._send(self.card.transmit(payload))
        except (OSError, ConnectionError) as e:
            if not self._stopping:
                self.error = e
        except BaseException as e:  # a bug in a card emulator: keep it for the test to see
            self.error = e

    def stop(self) -> None:
        self._stopping = True
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def pcsc_available() -> str | None:
    """None when pcscd, vpcd and pyscard are installed, else what is missing."""
    if shutil.which("pcscd", path=_SBIN_PATH) is None:
        return "pcscd is not installed (Debian package pcscd)"
    if not VPCD_DRIVER.exists():
        return "the vpcd driver is not installed (Debian package vsmartcard-vpcd)"
    try:
        import smartcard  # noqa: F401
    except ImportError:
        return "pyscard is not installed (pip install pyscard)"
    if os.geteuid() != 0 and not _socket_alive(PCSCD_SOCKET):
        return "pcscd is not running and only root can start it"
    return None


__all__ = [
    "FIDO_SLOT",
    "PIV_SLOT",
    "PcscService",
    "VirtualCard",
    "VpcdLink",
    "VpcdReader",
    "ensure_pcscd",
    "pcsc_available",
]
