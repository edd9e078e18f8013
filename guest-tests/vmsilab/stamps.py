"""Stamp files that make the build resumable and idempotent.

A step writes its stamp only after it fully succeeded, with a key describing its
inputs (package versions, template hash). An interrupted step has no stamp and is
redone; a changed input changes the key and the step is redone too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def digest(*parts: str | bytes) -> str:
    """Short content hash of the inputs of a step."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


class Stamps:
    """Stamp files under one directory, one per step name."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.stamp"

    def done(self, name: str, key: str = "") -> bool:
        p = self._path(name)
        return p.is_file() and p.read_text().strip() == key

    def key(self, name: str) -> str | None:
        p = self._path(name)
        return p.read_text().strip() if p.is_file() else None

    def mark(self, name: str, key: str = "") -> None:
        """Write atomically so a crash never leaves a half-written, matching stamp."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(name).with_suffix(".tmp")
        tmp.write_text(key + "\n")
        os.replace(tmp, self._path(name))

    def clear(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.stamp"))
