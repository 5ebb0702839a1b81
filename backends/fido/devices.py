"""Finding the authenticator named by the `device` setting.

* `auto`: the first FIDO2 authenticator on USB HID, else the first on a PC/SC reader.
* a HID path such as `/dev/hidraw3`: that device.
* `pcsc`, or `pcsc:NAME`: the first PC/SC reader (whose name contains NAME) holding a card
  with the FIDO applet: NFC readers, or a key in a smart-card slot.

No setting names a test device: the test suite passes its software authenticator to
`Keystore(device_factories=...)` (`BackendContext.device_factory`, see `from_factory`), so a
config file cannot reach it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from strongroom.errors import InvalidArgument

if TYPE_CHECKING:
    from fido2.ctap import CtapDevice

PCSC = "pcsc"


class NoDevice(Exception):
    """No authenticator answers to the `device` setting; the message says what to do."""


def valid_setting(spec: str) -> bool:
    return spec in ("auto", PCSC) or spec.startswith((PCSC + ":", "/", "hid:"))


def from_factory(factory: Callable[[], object]) -> tuple[CtapDevice, str]:
    """The device the caller passed in (`BackendContext.device_factory`), and a description."""
    from fido2.ctap import CtapDevice

    device = factory()
    if not isinstance(device, CtapDevice):
        raise InvalidArgument(
            f"the fido device factory returned {type(device).__name__}, "
            "not a python-fido2 CtapDevice"
        )
    return device, f"{type(device).__name__} passed to the keystore"


def open_device(spec: str) -> tuple[CtapDevice, str]:
    """Open the device `spec` names; return it and a description. NoDevice if none."""
    if spec == "auto":
        hid_device, hid_note = _first_hid()
        if hid_device is not None:
            return hid_device
        pcsc_device, pcsc_note = _first_pcsc("")
        if pcsc_device is not None:
            return pcsc_device
        raise NoDevice(
            f"no FIDO2 security key found: {hid_note}; {pcsc_note}. Plug in a key (or put it on "
            "the NFC reader), or set device to a HID path or pcsc"
        )
    if spec == PCSC or spec.startswith(PCSC + ":"):
        reader = spec.partition(":")[2]
        pcsc_device, pcsc_note = _first_pcsc(reader)
        if pcsc_device is not None:
            return pcsc_device
        raise NoDevice(f"no FIDO2 security key found: {pcsc_note}")
    path = spec[len("hid:") :] if spec.startswith("hid:") else spec
    return _hid_path(path)


def _first_hid() -> tuple[tuple[CtapDevice, str] | None, str]:
    try:
        from fido2.hid import CtapHidDevice
    except Exception as e:  # an OS without a supported HID backend
        return None, f"USB HID is not usable here ({type(e).__name__})"
    try:
        for device in CtapHidDevice.list_devices():
            path = device.descriptor.path
            return (device, f"USB HID {os.fsdecode(path) if isinstance(path, bytes) else path}"), ""
    except Exception as e:  # e.g. /sys/class/hidraw missing in a container
        return None, f"no USB HID authenticator (listing failed: {type(e).__name__})"
    return None, "no USB HID authenticator"


def _hid_path(path: str) -> tuple[CtapDevice, str]:
    try:
        from fido2.hid import open_device as open_hid
    except Exception as e:
        raise NoDevice(f"USB HID is not usable here ({type(e).__name__})") from None
    try:
        return open_hid(path), f"USB HID {path}"
    except FileNotFoundError:
        raise NoDevice(f"no device at {path}; is the security key plugged in?") from None
    except PermissionError:
        raise NoDevice(
            f"no permission to open {path}; add a udev rule (e.g. the libfido2 one) or join the "
            "group that owns it"
        ) from None
    except Exception as e:
        raise NoDevice(f"{path} is not a FIDO2 HID device ({type(e).__name__})") from None


def _first_pcsc(reader: str) -> tuple[tuple[CtapDevice, str] | None, str]:
    try:
        from fido2.pcsc import CtapPcscDevice
    except ImportError:
        return None, "PC/SC is not usable: pyscard is not installed (pip install pyscard)"
    try:  # pyscard has no type information; ask it through importlib
        names = [str(r) for r in importlib.import_module("smartcard.System").readers()]
    except Exception:
        return None, "PC/SC is not usable: pcscd is not running (start pcscd)"
    wanted = [n for n in names if reader in n]
    if not wanted:
        where = f" named like {reader!r}" if reader else ""
        return None, f"no PC/SC reader{where}"
    try:
        for device in CtapPcscDevice.list_devices(reader):
            return (device, f"PC/SC {device!r}"), ""
    except Exception as e:
        return None, f"PC/SC listing failed ({type(e).__name__})"
    return None, f"no card with the FIDO applet in PC/SC readers {', '.join(wanted)}"


__all__ = ["NoDevice", "from_factory", "open_device", "valid_setting"]
