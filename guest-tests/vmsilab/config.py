"""Where the lab lives and what host it runs on.

Everything the lab builds is cached under one directory (``VMSI_LAB_DIR``, default
``/var/tmp/vmsi-lab``) so that a second build is free and ``clean`` has one place to
look. Nothing machine-specific is written into the repository: the Debian mirror is
read from the host's apt configuration at run time (``VMSI_DEBIAN_MIRROR`` overrides).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

DEFAULT_LAB_DIR = "/var/tmp/vmsi-lab"
#: Where the lab directory appears inside the QEMU chroot.
CHROOT_LAB = Path("/lab")

#: Debian release whose backports carry QEMU >= 10.1 with vfio-user-pci.
QEMU_SUITE = "trixie"
QEMU_BACKPORTS = "trixie-backports"


class LabError(RuntimeError):
    """A lab step failed; the message says what and, where known, why."""


@dataclass(frozen=True)
class HostOS:
    """The parts of /etc/os-release that decide how QEMU is obtained."""

    id: str
    version_id: str
    codename: str

    @property
    def is_debian(self) -> bool:
        return self.id == "debian"

    @property
    def qemu_in_chroot(self) -> bool:
        """Debian 12 cannot take trixie-backports' QEMU without becoming half trixie
        (guest-lab.md §2.3), so QEMU lives in a trixie chroot there. On trixie itself
        the backports install is ordinary and QEMU runs on the host."""
        return self.codename != QEMU_SUITE


def read_os_release(path: Path = Path("/etc/os-release")) -> HostOS:
    """Parse os-release (shell-style KEY=value lines)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, val = line.partition("=")
        if sep:
            values[key.strip()] = val.strip().strip('"').strip("'")
    return HostOS(
        id=values.get("ID", ""),
        version_id=values.get("VERSION_ID", ""),
        codename=values.get("VERSION_CODENAME", ""),
    )


@dataclass(frozen=True)
class AptSource:
    """One (type, URI, suite) triple from the host's apt configuration."""

    kind: str
    uri: str
    suite: str


def _one_line_sources(text: str) -> list[AptSource]:
    out: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # Drop an options block: deb [signed-by=...] URI suite components
        line = re.sub(r"\[[^\]]*\]", " ", line)
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("deb", "deb-src"):
            out.append(AptSource(parts[0], parts[1], parts[2]))
    return out


def _deb822_sources(text: str) -> list[AptSource]:
    out: list[AptSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.lstrip().startswith("#"):
                continue
            key, sep, val = line.partition(":")
            if sep and not line[:1].isspace():
                fields[key.strip().lower()] = val.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for kind in fields.get("types", "").split():
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    out.append(AptSource(kind, uri, suite))
    return out


def host_apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """All enabled sources apt itself would read (only *.list and *.sources count)."""
    sources: list[AptSource] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        sources += _one_line_sources(main.read_text())
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.suffix == ".list":
                sources += _one_line_sources(f.read_text())
            elif f.suffix == ".sources":
                sources += _deb822_sources(f.read_text())
    return sources


def detect_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian archive URL the host already uses, so the lab needs no configuration.

    Picks a ``deb`` source whose URI path ends in ``/debian`` (the main archive, not
    ``debian-security``) and whose suite is not a security suite.
    """
    env = os.environ.get("VMSI_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    for src in host_apt_sources(etc_apt):
        path = src.uri.rstrip("/").rsplit("/", 1)[-1]
        if src.kind == "deb" and path == "debian" and "security" not in src.suite:
            return src.uri.rstrip("/")
    raise LabError(
        "no Debian archive found in /etc/apt/sources.list{,.d/*.sources}; "
        "set VMSI_DEBIAN_MIRROR to a Debian mirror URL"
    )


@dataclass(frozen=True)
class LabPaths:
    """The lab directory layout. Every artefact has exactly one home here."""

    root: Path

    @classmethod
    def from_env(cls) -> LabPaths:
        return cls(Path(os.environ.get("VMSI_LAB_DIR", DEFAULT_LAB_DIR)).resolve())

    @property
    def rootfs(self) -> Path:
        """The trixie chroot holding QEMU (Debian 12 hosts only)."""
        return self.root / "rootfs"

    @property
    def debs(self) -> Path:
        """Downloaded guest .debs (never installed anywhere)."""
        return self.root / "debs"

    @property
    def extract(self) -> Path:
        """All guest .debs unpacked; the initramfs is picked from here."""
        return self.root / "extract"

    @property
    def stamps(self) -> Path:
        return self.root / "stamps"

    @property
    def state(self) -> Path:
        """Cross-process bookkeeping (mount holders, locks)."""
        return self.root / "state"

    @property
    def runs(self) -> Path:
        """One directory per guest/netns run: serial log, QMP socket, QEMU log."""
        return self.root / "runs"

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.root / "initramfs.cpio.gz"


@dataclass(frozen=True)
class LabConfig:
    """Paths plus the host facts that decide how things are built and run."""

    paths: LabPaths
    host: HostOS

    @classmethod
    def from_env(cls) -> LabConfig:
        return cls(LabPaths.from_env(), read_os_release())

    @cached_property
    def mirror(self) -> str:
        return detect_mirror()

    def inner_path(self, host_path: Path | str) -> Path:
        """Translate a host path under the lab dir into the path QEMU sees.

        In chroot mode the lab dir is bind-mounted at ``/lab``; on a trixie host QEMU
        runs in the host's filesystem and the path is unchanged.
        """
        p = Path(host_path).resolve()
        if not self.host.qemu_in_chroot:
            return p
        try:
            rel = p.relative_to(self.paths.root)
        except ValueError:
            raise LabError(f"{p} is not under the lab dir {self.paths.root}") from None
        return CHROOT_LAB / rel

    def env_prefix(self, netns: str | None = None) -> list[str]:
        """argv prefix that runs a program where QEMU and the peer's iperf3 live:
        optionally inside a netns, and inside the chroot on a Debian 12 host."""
        prefix = ["ip", "netns", "exec", netns] if netns else []
        if self.host.qemu_in_chroot:
            prefix += ["chroot", str(self.paths.rootfs)]
        return prefix
