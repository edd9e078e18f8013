"""Build the compiled fast lane: ``python -m vmsi_server.fastlane.build``.

cffi's API mode compiles ``lane.c``, ``rxcsum.c``, ``rx.c``, ``tx.c`` and ``vf.c`` with the
generated wrapper into ``vmsi_server/fastlane/_lane.*.so`` next to this file
(``make setup`` runs it; the .so is not committed). The cdef is the part of
``lane.h`` between its CDEF markers, with the integer ``#define`` names
substituted (cffi wants literal array sizes) and ``VL_CALLBACK`` read as
``extern "Python+C"``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HEADER = HERE / "lane.h"
SOURCES = (HERE / "lane.c", HERE / "rxcsum.c", HERE / "rx.c", HERE / "tx.c", HERE / "vf.c")
MODULE = "vmsi_server.fastlane._lane"

_DEFINE = re.compile(r"^#define\s+(\w+)\s+(\d+)\s*$", re.MULTILINE)


def cdef_text() -> str:
    text = HEADER.read_text()
    body = text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
    constants = dict(_DEFINE.findall(body))
    for name, value in constants.items():
        body = re.sub(rf"\[{name}\]", f"[{value}]", body)
    body = body.replace("VL_CALLBACK", 'extern "Python+C"')
    return body


def builder() -> Any:
    import cffi  # type: ignore[import-untyped]

    ffi = cffi.FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(
        MODULE,
        '#include "lane.h"',
        sources=[str(s) for s in SOURCES],
        include_dirs=[str(HERE)],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    )
    return ffi


def build(quiet: bool = True) -> Path:
    """Compile and install the module next to this file; returns its path."""
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        raise RuntimeError(f"no Python.h in {include}: install this Python's headers "
                           "(on Debian: apt-get install python3-dev)")
    ffi = builder()
    with tempfile.TemporaryDirectory(prefix="vmsi-fastlane-") as tmp:
        built = Path(ffi.compile(tmpdir=tmp, verbose=not quiet))
        target = HERE / built.name
        partial = HERE / f".{built.name}.partial"
        shutil.copyfile(built, partial)
        partial.replace(target)  # atomic: a running server never maps a half-written file
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = build(quiet=not args.verbose)
    except Exception as exc:  # no compiler, no headers: say so plainly
        print(f"fastlane: build failed: {exc}", file=sys.stderr)
        return 1
    print(f"fastlane: built {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
