"""Little helpers so tests read like register accesses."""

from __future__ import annotations

from vmsi_server.pci.config_space import ConfigEvent, ConfigSpace


def rd(space: ConfigSpace, offset: int, size: int) -> int:
    return int.from_bytes(space.read(offset, size), "little")


def wr(space: ConfigSpace, offset: int, size: int, value: int) -> list[ConfigEvent]:
    return space.write(offset, value.to_bytes(size, "little"))
