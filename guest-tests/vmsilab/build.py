"""Build the lab: QEMU with vfio-user-pci, guest kernel and initramfs.

Each step is guarded by a stamp (see stamps.py) whose key names its inputs, so a
second build with everything present does nothing and an interrupted one resumes
at the first incomplete step.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

from . import guestdebs, initramfs, qemubuild
from .config import QEMU_BACKPORTS, LabConfig, LabError
from .mounts import live_holders
from .progress import step
from .stamps import Stamps, digest

log = logging.getLogger("vmsilab")

#: Bump when a step's procedure changes in a way that invalidates old output.
LAYOUT = "1"


@dataclass(frozen=True)
class BuildInfo:
    """What the lab holds after a build."""

    qemu_version: str
    kernel_version: str
    guest_debs: list[str]
    in_chroot: bool


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab build needs root (debootstrap, chroot, mounts)")


def build_qemu(cfg: LabConfig, stamps: Stamps) -> str:
    """Steps 1-2: the chroot (Debian 12) and QEMU from trixie-backports."""
    if cfg.host.qemu_in_chroot:
        key = digest(LAYOUT, "minbase", *qemubuild.PEER_PACKAGES)
        if not stamps.done("rootfs", key):
            if live_holders(cfg):
                raise LabError("cannot rebuild the chroot while other processes use it")
            stamps.clear("qemu")
            with step(f"debootstrap trixie chroot in {cfg.paths.rootfs}"):
                qemubuild.debootstrap_rootfs(cfg)
            stamps.mark("rootfs", key)
        install = qemubuild.chroot_install_qemu
    else:
        install = qemubuild.host_install_qemu
    key = digest(LAYOUT, qemubuild.QEMU_PACKAGE, QEMU_BACKPORTS)
    if not stamps.done("qemu", key):
        with step(f"install {qemubuild.QEMU_PACKAGE} from {QEMU_BACKPORTS}"):
            install(cfg)
        with step("verify vfio-user-pci"):
            version = qemubuild.verify_vfio_user(cfg)
        stamps.mark("qemu", key)
        (cfg.paths.state / "qemu-version").write_text(version + "\n")
    return (cfg.paths.state / "qemu-version").read_text().strip()


def build_guest(cfg: LabConfig, stamps: Stamps) -> tuple[str, list[str]]:
    """Steps 3-4: guest .debs (+ library closure) and the initramfs."""
    p = cfg.paths
    debs_file = p.state / "guest-debs.json"
    key = digest(LAYOUT, repr(guestdebs.GUEST_TOOLS))
    if not stamps.done("guest-debs", key) or not debs_file.exists():
        stamps.clear("initramfs")
        with step("download and unpack guest .debs"):
            used = guestdebs.fetch_guest_debs(p)
        debs_file.write_text(json.dumps(used, indent=1) + "\n")
        stamps.mark("guest-debs", key)
    used = json.loads(debs_file.read_text())

    key = digest(LAYOUT, initramfs.init_script(), *initramfs.MODULES, *used)
    if not (stamps.done("initramfs", key) and p.initramfs.exists() and p.vmlinuz.exists()):
        with step("build initramfs"):
            kver = initramfs.build_initramfs(
                p.extract, p.state / "initramfs-root", p.initramfs, p.vmlinuz
            )
        (p.state / "kernel-version").write_text(kver + "\n")
        stamps.mark("initramfs", key)
    return (p.state / "kernel-version").read_text().strip(), used


def build(cfg: LabConfig | None = None) -> BuildInfo:
    """Build whatever is missing; return what the lab holds."""
    cfg = cfg or LabConfig.from_env()
    _require_root()
    cfg.paths.root.mkdir(parents=True, exist_ok=True)
    cfg.paths.state.mkdir(parents=True, exist_ok=True)
    stamps = Stamps(cfg.paths.stamps)
    qemu = build_qemu(cfg, stamps)
    kver, used = build_guest(cfg, stamps)
    info = BuildInfo(qemu, kver, used, cfg.host.qemu_in_chroot)
    (cfg.paths.state / "build.json").write_text(json.dumps(asdict(info), indent=1) + "\n")
    return info


def is_built(cfg: LabConfig) -> bool:
    """All stamps present and the artefacts on disk (cheap, no subprocesses)."""
    names = set(Stamps(cfg.paths.stamps).names())
    need = {"qemu", "guest-debs", "initramfs"} | ({"rootfs"} if cfg.host.qemu_in_chroot else set())
    return need <= names and cfg.paths.initramfs.exists() and cfg.paths.vmlinuz.exists()
