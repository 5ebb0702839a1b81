"""Test support: kill a child at a random point of its progress, not of the clock.

The child writes `R` when ready, then `B ...` before each change and `E` after it. The
parent waits for a random number (at least one) of `E` lines, so the kill lands after that
many changes however slow the machine is, then a random fraction of one change's time,
then sends SIGKILL. A test that asserts "changes were made" therefore cannot fail on a loaded
machine: the kill waits for the progress it needs.
"""

from __future__ import annotations

import os
import random
import signal
import time


def kill_after_progress(
    pid: int, r: int, rng: random.Random, max_acks: int, max_wait: float
) -> tuple[list[str], int]:
    """Wait for `R`, then for 1..max_acks acknowledged changes, then up to `max_wait` s; kill
    `pid` with SIGKILL, reap it, and return (every line it wrote, its wait status). At least
    one change is acknowledged per round unless the child dies on its own."""
    buffer = b""
    lines: list[str] = []
    acks = 0
    wanted = rng.randint(1, max_acks)
    ready = False
    while not ready or acks < wanted:
        chunk = os.read(r, 65536)
        if not chunk:  # the child died on its own: report what it wrote
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            line = raw.decode()
            lines.append(line)
            ready = ready or line == "R"
            acks += line == "E"
    time.sleep(rng.uniform(0, max_wait))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    while chunk := os.read(r, 65536):
        buffer += chunk
    lines += [raw.decode() for raw in buffer.split(b"\n") if raw]
    return lines, status


def apply_change(model: dict[str, int], op: str, name: str) -> None:
    """What an acknowledged change does to {key name: primary version}: generate and import
    make version 1, rotate adds one, delete removes the key, trim changes neither."""
    if op in ("generate", "import"):
        model[name] = 1
    elif op == "rotate":
        model[name] += 1
    elif op == "delete":
        del model[name]
