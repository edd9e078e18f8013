"""The generic byte/mask engine, independent of any device layout."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vmsi_server.pci.config_space import (
    CONFIG_SPACE_SIZE,
    ConfigEvent,
    ConfigSpace,
    FunctionLevelReset,
    Register,
    Watch,
)

from .helpers import rd, wr


@dataclass(frozen=True, slots=True)
class RecordingWatch(Watch):
    """Emits whenever touched, carrying old/new/strobed in a FunctionLevelReset-free way."""

    log: list[tuple[int, int, int]]

    def event(self, old: int, new: int, strobed: int) -> ConfigEvent | None:
        self.log.append((old, new, strobed))
        return FunctionLevelReset() if strobed else None


def small_space(log: list[tuple[int, int, int]] | None = None) -> ConfigSpace:
    regs = [
        Register("plain", 0x40, 4, 0x11223344, writable=0x00FF00FF),
        Register("status", 0x44, 2, 0x0010, w1c=0xFF00),
        Register("ctl", 0x46, 2, 0x0001, writable=0x00FF, strobe=0x8000),
    ]
    watches = [RecordingWatch(0x46, 2, log if log is not None else [])]
    return ConfigSpace(regs, watches)


def test_size_and_undeclared_bytes_read_zero_and_ignore_writes() -> None:
    space = small_space()
    assert space.size == CONFIG_SPACE_SIZE
    assert space.read(0x100, 8) == bytes(8)
    assert wr(space, 0x100, 4, 0xFFFFFFFF) == []
    assert space.read(0x100, 4) == bytes(4)
    assert space.read(0xFFC, 4) == bytes(4)


def test_writable_bits_take_the_value_read_only_bits_keep_reset() -> None:
    space = small_space()
    wr(space, 0x40, 4, 0xAABBCCDD)
    assert rd(space, 0x40, 4) == 0x11BB33DD
    wr(space, 0x40, 4, 0)
    assert rd(space, 0x40, 4) == 0x11003300


def test_w1c_bits_clear_only_where_one_is_written() -> None:
    space = small_space()
    space.device_write(0x44, (0xA510).to_bytes(2, "little"))
    wr(space, 0x44, 2, 0x0000)
    assert rd(space, 0x44, 2) == 0xA510
    wr(space, 0x44, 2, 0x2100)
    assert rd(space, 0x44, 2) == 0x8410
    wr(space, 0x44, 2, 0xFFFF)
    assert rd(space, 0x44, 2) == 0x0010  # the read-only bit survives


def test_strobe_reads_zero_and_reaches_the_watch_once_per_write() -> None:
    log: list[tuple[int, int, int]] = []
    space = small_space(log)
    events = wr(space, 0x46, 2, 0x8042)
    assert events == [FunctionLevelReset()]
    assert rd(space, 0x46, 2) == 0x0042
    assert log == [(0x0001, 0x0042, 0x8000)]
    # A one-byte write to the high byte alone still reports the strobe in position.
    log.clear()
    assert space.write(0x47, b"\x80") == [FunctionLevelReset()]
    assert log == [(0x0042, 0x0042, 0x8000)]
    # Writing 0 there is not a request.
    log.clear()
    assert space.write(0x47, b"\x00") == []
    assert log == [(0x0042, 0x0042, 0)]


def test_watch_sees_the_whole_write_not_byte_by_byte() -> None:
    log: list[tuple[int, int, int]] = []
    space = small_space(log)
    wr(space, 0x44, 4, 0x00AB_0000)  # spans status and ctl
    assert log == [(0x0001, 0x00AB, 0)]


def test_untouched_watches_are_not_called() -> None:
    log: list[tuple[int, int, int]] = []
    space = small_space(log)
    wr(space, 0x40, 4, 0xFFFFFFFF)
    wr(space, 0x45, 1, 0xFF)
    assert log == []


def test_device_write_bypasses_masks_and_emits_nothing() -> None:
    log: list[tuple[int, int, int]] = []
    space = small_space(log)
    space.device_write(0x40, b"\x01\x02\x03\x04")
    space.device_write(0x46, b"\xff\xff")
    assert rd(space, 0x40, 4) == 0x04030201
    assert log == []


def test_reset_restores_power_on_values() -> None:
    space = small_space()
    power_on = space.read(0, CONFIG_SPACE_SIZE)
    wr(space, 0x40, 4, 0xFFFFFFFF)
    space.device_write(0x44, b"\x00\xff")
    wr(space, 0x46, 2, 0x00FF)
    assert space.read(0, CONFIG_SPACE_SIZE) != power_on
    space.reset()
    assert space.read(0, CONFIG_SPACE_SIZE) == power_on


@pytest.mark.parametrize(
    ("offset", "count"),
    [(-1, 1), (0, -1), (CONFIG_SPACE_SIZE, 1), (CONFIG_SPACE_SIZE - 2, 4), (0, 4097)],
)
def test_out_of_bounds_access_raises_value_error(offset: int, count: int) -> None:
    space = small_space()
    with pytest.raises(ValueError):
        space.read(offset, count)
    with pytest.raises(ValueError):
        space.read_int(offset, count)
    if count >= 0:  # a write's count is len(data), never negative
        with pytest.raises(ValueError):
            space.write(offset, bytes(count))
        with pytest.raises(ValueError):
            space.device_write(offset, bytes(count))


def test_empty_accesses_are_fine_at_the_end() -> None:
    space = small_space()
    assert space.read(CONFIG_SPACE_SIZE, 0) == b""
    assert space.write(CONFIG_SPACE_SIZE, b"") == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 5},
        {"size": 2, "reset": 0x10000},
        {"size": 2, "writable": 0x1, "w1c": 0x1},
        {"size": 2, "writable": 0x8000, "strobe": 0x8000},
        {"size": 2, "strobe": 0x8000, "reset": 0x8000},
        {"size": 1, "offset": -1},
    ],
)
def test_register_rejects_inconsistent_declarations(kwargs: dict[str, int]) -> None:
    args: dict[str, int] = {"offset": 0x40, **kwargs}
    with pytest.raises(ValueError):
        Register("bad", **args)


def test_overlapping_registers_and_watches_are_rejected() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        ConfigSpace([Register("a", 0x40, 4), Register("b", 0x42, 2)])
    with pytest.raises(ValueError, match="overlaps"):
        ConfigSpace([], [Watch(0x40, 4), Watch(0x43, 1)])
    with pytest.raises(ValueError, match="runs past"):
        ConfigSpace([Register("a", 0xFE, 4)], size=0x100)
