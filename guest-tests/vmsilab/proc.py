"""Running host commands with errors that say what went wrong.

Build and lab steps shell out to apt, debootstrap, ip and QEMU. A bare
CalledProcessError hides the one line that matters, so failures here carry the
command and the tail of its output.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import LabError

log = logging.getLogger("vmsilab")


def tail(text: str | bytes, lines: int = 20) -> str:
    """Last lines of a log, decoded leniently (QEMU and serial logs may hold binary)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def file_tail(path: Path, lines: int = 20, max_bytes: int = 16384) -> str:
    """Tail of a file without reading all of it; empty string if it does not exist."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return tail(f.read(), lines)
    except FileNotFoundError:
        return ""


def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
    input_bytes: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise LabError with its output tail."""
    args = [str(a) for a in argv]
    log.debug("run: %s", " ".join(args))
    try:
        # Own process group: on timeout or interruption the whole tree goes
        # (debootstrap and apt leave dpkg/wget children behind otherwise).
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL if input_bytes is None else subprocess.PIPE,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            start_new_session=True,
        )
    except FileNotFoundError as e:
        raise LabError(f"command not found: {args[0]}") from e
    try:
        out, _ = proc.communicate(input_bytes, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        _kill_group(proc)
        raise LabError(f"timed out after {timeout} s: {' '.join(args)}") from e
    except BaseException:
        _kill_group(proc)
        raise
    text = (out or b"").decode("utf-8", "replace")
    cp = subprocess.CompletedProcess(args, proc.returncode, text, None)
    if check and cp.returncode != 0:
        raise LabError(
            f"command failed (rc={cp.returncode}): {' '.join(args)}\n{tail(cp.stdout or '')}"
        )
    return cp


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def output(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """stdout (and stderr) of a successful command, stripped."""
    return run(argv, env=env, timeout=timeout).stdout.strip()
