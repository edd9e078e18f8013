"""Guest userland and kernel from Debian .debs: download, unpack, library closure.

The guest runs the host release's Debian kernel and a handful of binaries (busybox,
iperf3, lspci, ethtool). Their shared libraries are found by asking the *guest's*
dynamic loader (``ld.so --list``, which is what ``ldd`` runs) with the library path
pointing into the unpacked tree; whatever it still resolves from the host, or not
at all, names a package to fetch next. That repeats until the closure is complete.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import hostapt
from .config import LabError, LabPaths
from .fsguard import safe_rmtree
from .proc import run

log = logging.getLogger("vmsilab")

#: Binaries the guest gets besides busybox, as (name, package).
GUEST_TOOLS: tuple[tuple[str, str], ...] = (
    ("iperf3", "iperf3"),
    ("lspci", "pciutils"),
    ("ethtool", "ethtool"),
)
MULTIARCH = "x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"
_BIN_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin")
_LIB_DIRS = (f"lib/{MULTIARCH}", f"usr/lib/{MULTIARCH}", "lib64", "usr/lib64")


def base_packages() -> list[str]:
    """Packages downloaded before the library closure runs."""
    return [
        hostapt.kernel_package(),
        "busybox-static",
        "iperf3",
        "libiperf0",
        "libsctp1",
        "libc6",
        hostapt.first_available("libssl3t64", "libssl3"),
        *(pkg for _, pkg in GUEST_TOOLS if pkg != "iperf3"),
    ]


def resolve_in(root: Path, rel: str | Path) -> Path:
    """Resolve symlinks as if ``root`` were ``/`` (absolute link targets stay inside).

    Debian's libc6 ships ``/lib64/ld-linux-x86-64.so.2`` as an absolute symlink;
    following it naively would land on the host's loader.
    """
    parts = list(Path("/", rel).parts[1:])
    cur = root
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            cur = cur.parent if cur != root else root
            continue
        nxt = cur / part
        if nxt.is_symlink():
            hops += 1
            if hops > 40:
                raise LabError(f"symlink loop resolving {rel} in {root}")
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = root
            parts = list(Path(target).parts) + parts
            if target.startswith("/"):
                parts = parts[1:]
            continue
        cur = nxt
    return cur


def find_in_tree(root: Path, name: str, dirs: tuple[str, ...]) -> Path | None:
    """First ``dir/name`` that exists in the unpacked tree, resolved inside it."""
    for d in dirs:
        p = resolve_in(root, f"{d}/{name}")
        if p.is_file():
            return p
    return None


def deb_name(deb: Path) -> str:
    """Package name from a ``name_version_arch.deb`` file name."""
    return deb.name.split("_", 1)[0]


@dataclass(frozen=True)
class LibRef:
    """One line of the loader's --list output."""

    soname: str
    path: str | None  # None: not found


def list_libs(x: Path, binary: Path) -> list[LibRef]:
    """Shared libraries ``binary`` needs, resolved against the unpacked tree first."""
    loader = find_in_tree(x, LOADER, _LIB_DIRS)
    if loader is None:
        raise LabError(f"no {LOADER} in {x} (is libc6 unpacked?)")
    libpath = ":".join(str(x / d) for d in _LIB_DIRS if (x / d).is_dir())
    # What ldd does (LD_TRACE_LOADED_OBJECTS), but with the guest's own loader, so the
    # host's and the guest's libc versions need not match; missing libraries are
    # reported as "not found" instead of failing.
    env = {"PATH": "/usr/bin:/bin", "LD_TRACE_LOADED_OBJECTS": "1", "LD_LIBRARY_PATH": libpath}
    cp = run([loader, binary], env=env, check=False)
    refs = []
    for line in cp.stdout.splitlines():
        m = re.match(r"\s*([^/\s]+)\s+=>\s+(not found|\S+)", line)  # skips the loader
        if m:
            refs.append(LibRef(m.group(1), None if m.group(2) == "not found" else m.group(2)))
    if cp.returncode != 0 and not refs:
        raise LabError(f"cannot list libraries of {binary}:\n{cp.stdout}")
    return refs


def tool_paths(x: Path) -> dict[str, Path]:
    """Where each guest tool (and busybox) sits in the unpacked tree."""
    found: dict[str, Path] = {}
    for name in ("busybox", *(n for n, _ in GUEST_TOOLS)):
        p = find_in_tree(x, name, _BIN_DIRS)
        if p is None:
            raise LabError(f"{name} not found in the unpacked guest tree {x}")
        found[name] = p
    return found


def missing_packages(x: Path) -> set[str]:
    """Packages that would provide libraries still resolved outside the tree."""
    need: set[str] = set()
    for name, binary in tool_paths(x).items():
        if name == "busybox":
            continue  # busybox-static has no dependencies
        for ref in list_libs(x, binary):
            if ref.path and Path(os.path.normpath(ref.path)).is_relative_to(x):
                continue
            pkg = hostapt.owner_of(ref.path) if ref.path else None
            pkg = pkg or hostapt.package_for_soname(ref.soname)
            if pkg is None:
                raise LabError(f"no package found for {ref.soname} (needed by {name})")
            need.add(pkg)
    return need


def unpack(deb: Path, x: Path) -> None:
    run(["dpkg-deb", "-x", deb, x])


def fetch_guest_debs(paths: LabPaths) -> list[str]:
    """Download the guest packages plus their library closure; unpack all of them.

    Idempotent: packages already in ``debs/`` are not fetched again. Downloads land in
    ``debs/.partial`` first so an interrupted download never looks complete. The tree
    in ``extract/`` is rebuilt from the .debs every time this runs.
    """
    debs, x = paths.debs, paths.extract
    partial = debs / ".partial"
    safe_rmtree(partial)
    debs.mkdir(parents=True, exist_ok=True)
    safe_rmtree(x)
    x.mkdir(parents=True)
    hostapt.apt_update()

    def have() -> dict[str, Path]:
        return {deb_name(d): d for d in debs.glob("*.deb")}

    def get(pkgs: set[str]) -> None:
        todo = sorted(pkgs - set(have()))
        if todo:
            log.info("downloading %s", " ".join(todo))
            hostapt.download(todo, partial)
            for d in partial.glob("*.deb"):
                os.replace(d, debs / d.name)
            safe_rmtree(partial)
        for name in sorted(pkgs):
            unpack(have()[name], x)

    wanted = set(base_packages())
    get(wanted)
    for _ in range(8):
        extra = missing_packages(x) - wanted
        if not extra:
            break
        log.info("library closure adds: %s", " ".join(sorted(extra)))
        wanted |= extra
        get(extra)
    else:
        raise LabError("library closure did not converge")
    # Packages from an older build (e.g. a superseded kernel) stay on disk but are not
    # part of this tree; report exactly what was used.
    used = sorted(have()[n].name for n in wanted)
    return used
