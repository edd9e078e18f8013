"""Guards against deleting host files through bind mounts.

A chroot with ``/dev``, ``/tmp`` and the lab dir bind-mounted into it looks like an
ordinary tree to ``rm -rf``, and deleting it deletes the host's files (guest-lab.md
§10). Bind mounts of the same filesystem keep ``st_dev``, so only the kernel's mount
table tells them apart: every deletion here checks /proc/self/mountinfo first.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .config import LabError
from .proc import run


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[Path]:
    """Mount points of this process's mount namespace, in mount order."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            points.append(Path(_unescape(line.split()[4])))
    return points


def is_mounted(path: Path) -> bool:
    """True if something is mounted exactly at ``path`` (bind mounts included)."""
    return Path(os.path.realpath(path)) in set(mount_points())


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (the order to unmount them)."""
    base = Path(os.path.realpath(path))
    found = {p for p in mount_points() if p == base or base in p.parents}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def umount(path: Path, *, lazy_fallback: bool = True) -> None:
    """Unmount one mount point; a busy mount is detached lazily only if asked to."""
    cp = run(["umount", path], check=False)
    if cp.returncode != 0 and is_mounted(path):
        if not lazy_fallback:
            raise LabError(f"cannot unmount {path}: {cp.stdout.strip()}")
        run(["umount", "-l", path])


def unmount_all_under(path: Path) -> None:
    """Unmount everything below ``path`` (used for debootstrap leftovers)."""
    for p in mounts_under(path):
        while is_mounted(p):  # stacked mounts need one umount each
            umount(p)


def safe_rmtree(path: Path) -> None:
    """Delete a tree, refusing if any mount point is at or under it.

    The walk also re-checks every directory against the mount table and never
    follows a directory on another device, as a second line of defence.
    """
    if not path.exists() and not path.is_symlink():
        return
    mounted = mounts_under(path)
    if mounted:
        raise LabError(
            f"refusing to delete {path}: mount points below it: {', '.join(map(str, mounted))}"
        )
    points = set(mount_points())
    root_dev = os.lstat(path).st_dev

    def check(dirpath: str) -> None:
        st = os.lstat(dirpath)
        if st.st_dev != root_dev or Path(dirpath) in points:
            raise LabError(f"refusing to delete {path}: {dirpath} is a mount point")

    for dirpath, _dirs, _files in os.walk(path, followlinks=False):
        check(dirpath)
    if stat.S_ISLNK(os.lstat(path).st_mode):
        path.unlink()
    else:
        shutil.rmtree(path)
