"""QEMU >= 10.1 with vfio-user-pci, from trixie-backports.

On Debian 12 it goes into a debootstrap'ed trixie chroot (installing it on the host
would drag half of trixie in, guest-lab.md §2.3); on Debian 13 it is an ordinary
backports install on the host.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from . import hostapt
from .config import QEMU_BACKPORTS, QEMU_SUITE, LabConfig, LabError
from .fsguard import safe_rmtree, unmount_all_under
from .mounts import ChrootMounts
from .proc import output, run

log = logging.getLogger("vmsilab")

QEMU_PACKAGE = "qemu-system-x86"
PEER_PACKAGES = ("iperf3", "iproute2")
_APT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
    "LC_ALL": "C",
    "HOME": "/root",
}


def backports_line(mirror: str) -> str:
    return f"deb {mirror} {QEMU_BACKPORTS} main\n"


def debootstrap_rootfs(cfg: LabConfig) -> None:
    """Create the trixie chroot in ``rootfs.partial`` and rename it when complete,
    so an interrupted debootstrap is simply started over."""
    rootfs = cfg.paths.rootfs
    partial = rootfs.with_name("rootfs.partial")
    hostapt.ensure_tools({"debootstrap": "debootstrap"})
    for tree in (partial, rootfs):
        unmount_all_under(tree)  # leftovers of an interrupted debootstrap or run
        safe_rmtree(tree)
    debootstrap = hostapt.which("debootstrap") or "debootstrap"
    run(
        [
            debootstrap,
            "--variant=minbase",
            "--include=" + ",".join(PEER_PACKAGES),
            QEMU_SUITE,
            partial,
            cfg.mirror,
        ],
        env={**os.environ, **_APT_ENV},
        timeout=3600,
    )
    unmount_all_under(partial)
    os.replace(partial, rootfs)


def chroot_install_qemu(cfg: LabConfig) -> None:
    """Add trixie-backports to the chroot and install QEMU from it."""
    rootfs = cfg.paths.rootfs
    src = rootfs / "etc" / "apt" / "sources.list.d" / "backports.list"
    src.write_text(backports_line(cfg.mirror))
    chroot = ["chroot", str(rootfs)]
    with ChrootMounts(cfg):
        run([*chroot, "apt-get", "update"], env=_APT_ENV, timeout=900)
        run(
            [
                *chroot,
                "apt-get",
                "install",
                "-y",
                "--no-install-recommends",
                "-t",
                QEMU_BACKPORTS,
                QEMU_PACKAGE,
            ],
            env=_APT_ENV,
            timeout=3600,
        )
        run([*chroot, "apt-get", "clean"], env=_APT_ENV)


def host_install_qemu(cfg: LabConfig) -> None:
    """Debian 13: backports install on the host, plus the peer tools."""
    src = Path("/etc/apt/sources.list.d/vmsi-trixie-backports.list")
    if not src.exists():
        src.write_text(backports_line(cfg.mirror))
    hostapt.apt_update(force=True)
    env = {**os.environ, **_APT_ENV}
    run(
        ["apt-get", "install", "-y", "--no-install-recommends", "-t", QEMU_BACKPORTS, QEMU_PACKAGE],
        env=env,
        timeout=3600,
    )
    run(["apt-get", "install", "-y", "--no-install-recommends", *PEER_PACKAGES], env=env)


def qemu_argv(cfg: LabConfig, *args: str) -> list[str]:
    """argv running qemu-system-x86_64 where it is installed (no netns)."""
    return [*cfg.env_prefix(None), "qemu-system-x86_64", *args]


def qemu_version(cfg: LabConfig) -> str:
    with ChrootMounts(cfg):
        text = output(qemu_argv(cfg, "--version"), env=_APT_ENV)
    m = re.search(r"version (\S+)", text)
    return m.group(1) if m else text.splitlines()[0]


def device_help(cfg: LabConfig, device: str | None = None) -> str:
    """``-device help`` or ``-device NAME,help`` output."""
    arg = "help" if device is None else f"{device},help"
    with ChrootMounts(cfg):
        return output(qemu_argv(cfg, "-device", arg), env=_APT_ENV)


def verify_vfio_user(cfg: LabConfig) -> str:
    """Fail unless QEMU lists vfio-user-pci; return the QEMU version."""
    if '"vfio-user-pci"' not in device_help(cfg):
        raise LabError(
            f"QEMU {qemu_version(cfg)} has no vfio-user-pci; it must come from "
            f"{QEMU_BACKPORTS} (>= 10.1)"
        )
    props = device_help(cfg, "vfio-user-pci")
    if "socket" not in props:
        raise LabError(f"vfio-user-pci lacks the socket property:\n{props}")
    return qemu_version(cfg)
