"""Status and safe removal of the lab directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .accel import detect_accel
from .build import is_built
from .config import LabConfig, LabError
from .fsguard import mounts_under, safe_rmtree, unmount_all_under
from .mounts import live_holders, unmount_all
from .netns import list_netns, reap_stale
from .stamps import Stamps


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def status(cfg: LabConfig) -> dict[str, Any]:
    """What is built, what is mounted, what is running; no side effects."""
    p = cfg.paths
    accel = detect_accel()
    return {
        "lab_dir": str(p.root),
        "host": f"{cfg.host.id} {cfg.host.version_id} ({cfg.host.codename})",
        "qemu_in_chroot": cfg.host.qemu_in_chroot,
        "built": is_built(cfg),
        "stamps": Stamps(p.stamps).names(),
        "qemu_version": _read(p.state / "qemu-version"),
        "kernel_version": _read(p.state / "kernel-version"),
        "guest_debs": json.loads(_read(p.state / "guest-debs.json") or "[]"),
        "accel": f"{accel.name} ({accel.reason})",
        "mounts": [str(m) for m in mounts_under(p.root)] if p.root.exists() else [],
        "mount_holders": sorted(live_holders(cfg)) if p.state.exists() else [],
        "netns": [n for n in list_netns() if n.startswith("vmsi-")],
    }


def clean(cfg: LabConfig, *, runs_only: bool = False) -> list[str]:
    """Remove the lab (or only its run logs) after unmounting; refuse while in use."""
    p = cfg.paths
    if not p.root.exists():
        return []
    holders = live_holders(cfg)
    if holders:
        raise LabError(f"lab in use by PIDs {sorted(holders)}; not cleaning")
    reap_stale()
    if runs_only:
        safe_rmtree(p.runs)
        return [str(p.runs)]
    if cfg.host.qemu_in_chroot and p.rootfs.exists():
        unmount_all(cfg)
    unmount_all_under(p.root)
    left = mounts_under(p.root)
    if left:
        raise LabError(f"still mounted under {p.root}: {left}")
    safe_rmtree(p.root)
    return [str(p.root)]
