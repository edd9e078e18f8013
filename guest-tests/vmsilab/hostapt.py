"""The host's apt, used read-mostly: look-ups, downloads, and the few host tools.

Guest packages are only ever *downloaded* (``apt-get download``) and unpacked with
``dpkg-deb -x``; nothing of the guest is installed on the host. The only host
installs are build tools such as debootstrap (and QEMU itself on a trixie host).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from .proc import output, run

log = logging.getLogger("vmsilab")

_APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
_updated = False


def apt_update(*, force: bool = False) -> None:
    """``apt-get update`` once per process (look-ups need fresh lists)."""
    global _updated
    if _updated and not force:
        return
    run(["apt-get", "update"], env=_APT_ENV, timeout=900)
    _updated = True


def ensure_tools(tools: dict[str, str]) -> None:
    """Install the packages providing missing commands (``{command: package}``)."""
    missing = sorted({pkg for cmd, pkg in tools.items() if not shutil.which(cmd, path=_SBIN_PATH)})
    if not missing:
        return
    log.info("installing host packages: %s", " ".join(missing))
    apt_update()
    run(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        env=_APT_ENV,
        timeout=1800,
    )


_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def which(cmd: str) -> str | None:
    """``shutil.which`` that also looks in the sbin dirs (debootstrap lives there)."""
    return shutil.which(cmd, path=_SBIN_PATH)


def available(pkg: str) -> bool:
    """True if apt knows a candidate for ``pkg``."""
    cp = run(["apt-cache", "policy", pkg], check=False, env=_APT_ENV)
    m = re.search(r"Candidate:\s*(\S+)", cp.stdout)
    return bool(m) and m.group(1) != "(none)"  # type: ignore[union-attr]


def first_available(*candidates: str) -> str:
    """The first package name apt knows (packages get renamed, e.g. libssl3t64)."""
    for c in candidates:
        if available(c):
            return c
    raise LookupError(f"none of these packages is available: {', '.join(candidates)}")


def kernel_package() -> str:
    """The versioned kernel package the ``linux-image-amd64`` metapackage points at."""
    text = output(["apt-cache", "depends", "linux-image-amd64"], env=_APT_ENV)
    m = re.search(r"Depends:\s*(linux-image-[0-9]\S*)", text)
    if not m:
        raise LookupError(f"cannot resolve linux-image-amd64:\n{text}")
    return m.group(1)


def download(pkgs: list[str], dest: Path) -> None:
    """``apt-get download`` into ``dest`` (the caller handles atomicity)."""
    dest.mkdir(parents=True, exist_ok=True)
    # _apt cannot write into a root-owned dir; that only costs a warning, but
    # opening the dir avoids the noise.
    os.chmod(dest, 0o777)
    run(["apt-get", "download", *pkgs], cwd=dest, env=_APT_ENV, timeout=1800)


def owner_of(path: str) -> str | None:
    """The installed host package owning ``path`` (binary package name, arch dropped)."""
    for candidate in (path, os.path.realpath(path)):
        cp = run(["dpkg", "-S", candidate], check=False, env=_APT_ENV)
        if cp.returncode == 0 and ":" in cp.stdout:
            return cp.stdout.split(":", 1)[0].split(",")[0].strip()
    # usrmerge: dpkg may know the file under the other spelling (/lib vs /usr/lib)
    alt = path[4:] if path.startswith("/usr/") else "/usr" + path
    cp = run(["dpkg", "-S", alt], check=False, env=_APT_ENV)
    if cp.returncode == 0 and ":" in cp.stdout:
        return cp.stdout.split(":", 1)[0].split(",")[0].strip()
    return None


def package_for_soname(soname: str) -> str | None:
    """Guess the Debian package shipping a library from its soname (policy 8.1).

    ``libfoo.so.1`` is in ``libfoo1``, ``libfoo2.0.so.0`` in ``libfoo2.0-0``; the
    64-bit-time transition appended ``t64`` to some.
    """
    m = re.fullmatch(r"(lib[^/]+?)\.so\.(\d+)(?:\.\d+)*", soname)
    if not m:
        return None
    name, ver = m.group(1).lower(), m.group(2)
    base = f"{name}-{ver}" if name[-1].isdigit() else f"{name}{ver}"
    for cand in (base, base + "t64"):
        if available(cand):
            return cand
    return None
