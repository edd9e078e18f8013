"""Bind mounts that make the QEMU chroot usable, with safe teardown.

QEMU in the trixie chroot needs /proc, /dev (tun, kvm), /dev/pts, /dev/shm, /sys and
the lab dir (at /lab: kernel, sockets, logs). Several users may need them at once
(a pytest session, a CLI run, nested context managers), so the mounts are shared:

* in-process, a refcount per rootfs;
* across processes, a holders file (PIDs, under flock) in the lab's state dir.

Whoever drops the last live holder unmounts, in the order of guest-lab.md §2.4,
which also cleans up after holders that died without releasing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from .config import LabConfig, LabError
from .fsguard import is_mounted, umount
from .proc import run

log = logging.getLogger("vmsilab")

#: (path in rootfs, source or None for procfs), in mount order.
MOUNTS: tuple[tuple[str, str | None], ...] = (
    ("proc", None),
    ("dev", "/dev"),
    ("dev/pts", "/dev/pts"),
    ("dev/shm", "/dev/shm"),
    ("sys", "/sys"),
    ("tmp", "/tmp"),
    ("lab", "LAB"),
)
#: Teardown order: children before parents, the lab (host data) first.
UNMOUNT_ORDER = ("lab", "dev/pts", "dev/shm", "dev", "sys", "tmp", "proc")

_refs: dict[Path, int] = {}
_refs_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _holders(cfg: LabConfig) -> Iterator[set[int]]:
    """Locked read-modify-write of the live holder PIDs."""
    cfg.paths.state.mkdir(parents=True, exist_ok=True)
    lock_path = cfg.paths.state / "mounts.lock"
    file = cfg.paths.state / "mounts.holders"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pids = set()
            if file.exists():
                pids = {int(x) for x in file.read_text().split() if x.isdigit()}
            pids = {p for p in pids if _pid_alive(p)}
            yield pids
            file.write_text("".join(f"{p}\n" for p in sorted(pids)))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def mount_all(cfg: LabConfig) -> None:
    """Mount whatever is missing (idempotent)."""
    rootfs = cfg.paths.rootfs
    if not (rootfs / "usr").is_dir():
        raise LabError(f"no chroot at {rootfs}; run `python -m vmsilab build`")
    for rel, src in MOUNTS:
        target = rootfs / rel
        target.mkdir(parents=True, exist_ok=True)
        if is_mounted(target):
            continue
        if src is None:
            run(["mount", "-t", "proc", "proc", target])
        else:
            source = cfg.paths.root if src == "LAB" else Path(src)
            run(["mount", "--bind", source, target])


def unmount_all(cfg: LabConfig) -> None:
    """Unmount in the safe order and verify; raise if anything stays mounted."""
    rootfs = cfg.paths.rootfs
    for rel in UNMOUNT_ORDER:
        target = rootfs / rel
        for _ in range(4):  # a mount may be stacked (mounted twice)
            if not is_mounted(target):
                break
            umount(target)
    left = [rel for rel in UNMOUNT_ORDER if is_mounted(rootfs / rel)]
    if left:
        raise LabError(f"still mounted in {rootfs}: {left}")


def live_holders(cfg: LabConfig) -> set[int]:
    """PIDs (other than ours) that currently hold the chroot mounts."""
    with _holders(cfg) as pids:
        return set(pids) - {os.getpid()}


class ChrootMounts:
    """Context manager holding the chroot bind mounts (no-op on a trixie host)."""

    def __init__(self, cfg: LabConfig) -> None:
        self.cfg = cfg
        self._entered = False

    def __enter__(self) -> ChrootMounts:
        if not self.cfg.host.qemu_in_chroot:
            return self
        key = self.cfg.paths.rootfs
        with _refs_lock:
            first = _refs.get(key, 0) == 0
            if first:
                with _holders(self.cfg) as pids:
                    mount_all(self.cfg)
                    pids.add(os.getpid())
            _refs[key] = _refs.get(key, 0) + 1
        self._entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._entered:
            return
        self._entered = False
        key = self.cfg.paths.rootfs
        with _refs_lock:
            _refs[key] -= 1
            if _refs[key] > 0:
                return
            del _refs[key]
            with _holders(self.cfg) as pids:
                pids.discard(os.getpid())
                if not pids:
                    log.debug("unmounting chroot binds in %s", key)
                    unmount_all(self.cfg)
