"""The guest initramfs: assembled from the unpacked .debs, packed with busybox cpio.

The base image (busybox, iperf3, lspci, ethtool, NIC modules, /init) is built once
and cached. A per-run script is delivered as a second, tiny newc archive in front of
the base one: Linux unpacks concatenated cpio archives in order (the layout early
microcode loading uses), so any shell script reaches the guest without squeezing it
through the kernel command line, which has no quoting.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import re
import shutil
import subprocess
from pathlib import Path

from .config import LabError
from .fsguard import safe_rmtree
from .guestdebs import LOADER, MULTIARCH, list_libs, resolve_in, tool_paths
from .proc import run

log = logging.getLogger("vmsilab")

#: Modules packed (plus dependencies). igbvf is the driver for the project's VF;
#: e1000e and virtio-net are QEMU's own NICs for baselines.
MODULES: tuple[str, ...] = ("igbvf", "ixgbevf", "e1000e", "virtio_pci", "virtio_net")
INIT_TEMPLATE = Path(__file__).with_name("init.sh")
_DIRS = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    f"lib/{MULTIARCH}",
    "lib64",
    "etc",
    "proc",
    "sys",
    "dev",
    "tmp",
    "run",
    "root",
    "var",
)


def init_script() -> str:
    return INIT_TEMPLATE.read_text()


# --- newc writer ------------------------------------------------------------------


def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    namez = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0)
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = hdr + namez
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def newc_archive(files: dict[str, tuple[int, bytes]]) -> bytes:
    """An uncompressed newc archive of regular files ``{path: (mode, data)}``,
    padded to 512 bytes so the next concatenated archive starts aligned."""
    body = b"".join(
        _newc_entry(name.lstrip("/"), 0o100000 | mode, data, ino=i + 1)
        for i, (name, (mode, data)) in enumerate(sorted(files.items()))
    )
    body += _newc_entry("TRAILER!!!", 0)
    return body + b"\0" * (-len(body) % 512)


def make_run_initrd(base: Path, script: str, dest: Path) -> Path:
    """Per-run initrd: ``/lab-run.sh`` in a small archive, then the base initramfs."""
    head = newc_archive({"lab-run.sh": (0o755, script.encode())})
    tmp = dest.with_suffix(".tmp")
    with tmp.open("wb") as out, base.open("rb") as src:
        out.write(head)
        shutil.copyfileobj(src, out, 1 << 20)
    os.replace(tmp, dest)
    return dest


# --- base image --------------------------------------------------------------------


def _modules_root(x: Path) -> tuple[Path, str]:
    """(depmod base dir, kernel version) of the unpacked kernel package."""
    for base in (x, x / "usr"):
        mods = base / "lib" / "modules"
        if mods.is_dir():
            kvers = sorted(p.name for p in mods.iterdir() if (p / "kernel").is_dir())
            if kvers:
                return base, kvers[-1]
    raise LabError(f"no kernel modules in {x}")


def _modname(path: str) -> str:
    name = Path(path).name
    name = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", name)
    return name.replace("-", "_")


def _module_closure(moddir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Relative paths of the wanted modules and everything they depend on."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[_modname(path)] = (path, rest.split())
    out: list[str] = []
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name not in deps:
            raise LabError(f"module {name} not in {moddir}/modules.dep")
        path, needs = deps[name]
        if path not in out:
            out.append(path)
            todo += [_modname(n) for n in needs]
    return out


def _copy_module(src: Path, dest_dir: Path, rel: str) -> None:
    """Copy one module, decompressed: busybox modprobe loads plain .ko files."""
    target = dest_dir / re.sub(r"\.(xz|zst|gz)$", "", rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    if rel.endswith(".xz"):
        target.write_bytes(lzma.decompress(src.read_bytes()))
    elif rel.endswith(".gz"):
        target.write_bytes(gzip.decompress(src.read_bytes()))
    elif rel.endswith(".zst"):
        run(["zstd", "-q", "-d", "-f", "-o", target, src])
    else:
        shutil.copy2(src, target)


def kernel_version(x: Path) -> str:
    return _modules_root(x)[1]


def install_modules(x: Path, root: Path, busybox: Path) -> str:
    """Put MODULES (+ deps) and a fresh modules.dep into the initramfs tree."""
    base, kver = _modules_root(x)
    moddir = base / "lib" / "modules" / kver
    if not (moddir / "modules.dep").is_file():
        # The kernel .deb ships no modules.dep and minimal hosts have no kmod.
        run([busybox, "depmod", "-b", base, kver])
    dest = root / "lib" / "modules" / kver
    for rel in _module_closure(moddir, MODULES):
        _copy_module(moddir / rel, dest, rel)
    for extra in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (moddir / extra).is_file():
            text = (moddir / extra).read_bytes()
            if extra == "modules.order":
                text = re.sub(rb"\.ko\.(xz|zst|gz)", b".ko", text)
            (dest / extra).write_bytes(text)
    run([busybox, "depmod", "-b", root, kver])
    (root / "etc" / "modules").write_text("".join(m + "\n" for m in MODULES))
    return kver


def install_binaries(x: Path, root: Path) -> None:
    """Busybox, the guest tools, their libraries (from the unpacked tree) and the loader."""
    tools = tool_paths(x)
    shutil.copy2(tools.pop("busybox"), root / "bin" / "busybox")
    libs: dict[str, Path] = {}
    for name, src in tools.items():
        shutil.copy2(src, root / "usr" / "bin" / name)
        for ref in list_libs(x, src):
            if ref.path is None or not Path(os.path.normpath(ref.path)).is_relative_to(x):
                raise LabError(f"{name}: {ref.soname} not resolved inside {x}")
            libs[ref.soname] = resolve_in(x, Path(ref.path).relative_to(x))
    for soname, src in libs.items():
        shutil.copy2(src, root / "lib" / MULTIARCH / soname)
    loader = resolve_in(x, f"lib64/{LOADER}")
    if not loader.is_file():
        loader = resolve_in(x, f"usr/lib64/{LOADER}")
    shutil.copy2(loader, root / "lib64" / LOADER)
    shutil.copy2(loader, root / "lib" / MULTIARCH / LOADER)


def build_initramfs(x: Path, work: Path, dest: Path, vmlinuz_dest: Path) -> str:
    """Assemble the tree in ``work``, pack it to ``dest`` (gzip -1) and copy the
    kernel to ``vmlinuz_dest``. Returns the kernel version."""
    safe_rmtree(work)
    for d in _DIRS:
        (work / d).mkdir(parents=True, exist_ok=True)
    busybox = tool_paths(x)["busybox"]
    install_binaries(x, work)
    kver = install_modules(x, work, busybox)
    init = work / "init"
    init.write_text(init_script())
    init.chmod(0o755)

    names = sorted(
        "." if p == work else "./" + str(p.relative_to(work)) for p in [work, *work.rglob("*")]
    )
    cp = subprocess.run(
        [str(busybox), "cpio", "-o", "-H", "newc"],
        cwd=work,
        input="\n".join(names).encode() + b"\n",
        capture_output=True,
        check=False,
    )
    if cp.returncode != 0:
        raise LabError(f"busybox cpio failed: {cp.stderr.decode(errors='replace')}")
    tmp = dest.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", compresslevel=1, mtime=0) as gz:
        gz.write(cp.stdout)
    os.replace(tmp, dest)

    kernel = resolve_in(x, f"boot/vmlinuz-{kver}")
    if not kernel.is_file():
        raise LabError(f"no kernel image boot/vmlinuz-{kver} in {x}")
    shutil.copy2(kernel, vmlinuz_dest.with_suffix(".tmp"))
    os.replace(vmlinuz_dest.with_suffix(".tmp"), vmlinuz_dest)
    safe_rmtree(work)
    return kver
