"""The ctypes layer: finding the library, checking its ABI, locating its eventfd table."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bindings import libvfio_user as vfu


# -- finding the library (no library needed) --------------------------------------
def test_not_found_says_how_to_point_at_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vfu.ENV_VAR, raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(vfu.LibraryNotFound) as info:
        vfu.resolve_path()
    text = str(info.value)
    assert "--libvfio-user" in text and vfu.ENV_VAR in text and "not found" in text


def test_explicit_path_wins_and_must_exist(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    real = tmp_path / "libvfio-user.so.0"
    real.write_bytes(b"")
    monkeypatch.setenv(vfu.ENV_VAR, "/elsewhere/libvfio-user.so")
    assert vfu.resolve_path(str(real)) == str(real)
    with pytest.raises(vfu.LibraryNotFound, match="--libvfio-user names /nope"):
        vfu.resolve_path("/nope/libvfio-user.so")


def test_env_var_before_linker_search(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"")
    monkeypatch.setenv(vfu.ENV_VAR, str(lib))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libvfio-user.so.0")
    assert vfu.resolve_path() == str(lib)
    monkeypatch.setenv(vfu.ENV_VAR, str(tmp_path / "gone.so"))
    with pytest.raises(vfu.LibraryNotFound, match=vfu.ENV_VAR):
        vfu.resolve_path()


def test_a_library_without_the_api_is_named_as_such() -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    with pytest.raises(vfu.AbiMismatch, match="does not export vfu_create_ctx"):
        vfu.load(libc)


def test_cli_refuses_with_the_reason(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmsi_server", "--backend", "libvfio-user",
         "--libvfio-user", str(tmp_path / "missing.so"), "--socket-path",
         str(tmp_path / "s"), "--no-slowpath"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "missing.so, which does not exist" in result.stderr
    assert not (tmp_path / "s").exists()


def test_cli_refuses_fd_with_libvfio_user() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmsi_server", "--backend", "libvfio-user", "--fd", "3"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "--fd is for the engine" in result.stderr


def test_struct_layouts_match_the_c_ones() -> None:
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        pytest.skip("sizes below are the LP64 ones")
    assert ctypes.sizeof(vfu.Iovec) == 16
    assert ctypes.sizeof(vfu.VfuDmaInfo) == 56
    assert vfu.VfuDmaInfo.vaddr.offset == 16 and vfu.VfuDmaInfo.prot.offset == 48
    assert ctypes.sizeof(vfu.DmaSg) == 40


# -- the eventfd table scanner, on a fake context (no library needed) ----------------
def _fake_ctx(counts: tuple[int, ...], callbacks: tuple[int, ...],
              table: ctypes.Array[ctypes.c_int]) -> ctypes.Array[ctypes.c_char]:
    block = bytearray(4096)
    at = 1000  # somewhere inside, 8-aligned like the real one
    struct.pack_into("<5I", block, at, *counts)
    struct.pack_into("<5Q", block, at + 24, *callbacks)
    struct.pack_into("<Q", block, at + 64, ctypes.addressof(table))
    return (ctypes.c_char * len(block)).from_buffer_copy(block)


def _table(max_ivs: int) -> ctypes.Array[ctypes.c_int]:
    values = [-1, -1, max_ivs] + [-1] * max_ivs
    return (ctypes.c_int * len(values))(*values)


def test_irq_table_is_found_by_its_contents() -> None:
    table = _table(3)
    ctx = _fake_ctx((0, 0, 3, 1, 1), (0, 0, 0xDEAD0, 0, 0), table)
    found = vfu.IrqTable.locate(ctypes.addressof(ctx), (0, 0, 3, 1, 1), (0, 0, 0xDEAD0, 0, 0))
    assert found.address == ctypes.addressof(table)
    assert [found.efd(v) for v in range(3)] == [-1, -1, -1]
    before = found.raw()
    table[3 + 1] = 42  # the library installs an eventfd for vector 1
    assert found.efd(1) == 42 and found.raw() != before


def test_irq_table_mismatch_names_what_was_sought() -> None:
    table = _table(3)
    ctx = _fake_ctx((0, 0, 3, 1, 1), (0, 0, 0xDEAD0, 0, 0), table)
    with pytest.raises(vfu.AbiMismatch, match=r"0 matches for irq_count=\(0, 0, 3, 1, 1\)"):
        vfu.IrqTable.locate(ctypes.addressof(ctx), (0, 0, 3, 1, 1), (0, 0, 0xBEEF0, 0, 0))
    table[1] = 7  # a table that is not in its pristine state is not taken either
    with pytest.raises(vfu.AbiMismatch):
        vfu.IrqTable.locate(ctypes.addressof(ctx), (0, 0, 3, 1, 1), (0, 0, 0xDEAD0, 0, 0))


# -- against the real library ------------------------------------------------------
def test_loaded_library_checks_out(library_path: str) -> None:
    lib = vfu.load(library_path)
    assert lib.dma_sg_size() == ctypes.sizeof(vfu.DmaSg)
    assert vfu.load(library_path) is lib  # loaded once


def test_context_lifecycle_and_table(library_path: str, tmp_path: Path) -> None:
    lib = vfu.load(library_path)
    path = str(tmp_path / "raw.sock")
    ctx = lib.vfu_create_ctx(vfu.VFU_TRANS_SOCK, path.encode(), vfu.LIBVFIO_USER_FLAG_ATTACH_NB,
                             None, vfu.VFU_DEV_TYPE_PCI)
    assert ctx, os.strerror(ctypes.get_errno())
    try:
        assert lib.vfu_pci_init(ctx, vfu.VfuPciType.EXPRESS, vfu.PCI_HEADER_TYPE_NORMAL, 0) == 0
        lib.vfu_pci_set_id(ctx, 0x8086, 0x10CA, 0, 0)
        assert lib.vfu_setup_device_nr_irqs(ctx, vfu.VfuIrqType.MSIX, 3) == 0
        cb = vfu.IRQ_STATE_CB(lambda *_: None)
        assert lib.vfu_setup_irq_state_callback(ctx, vfu.VfuIrqType.MSIX, cb) == 0
        assert lib.vfu_realize_ctx(ctx) == 0
        table = vfu.IrqTable.locate(ctx, (0, 0, 3, 1, 1), (0, 0, vfu.function_address(cb), 0, 0))
        assert table.max_ivs == 3 and table.err_efd == -1
        # Not attached: attach would block only with a client; with none it says EAGAIN.
        assert lib.vfu_attach_ctx(ctx) == -1 and ctypes.get_errno() == 11
        assert lib.vfu_irq_trigger(ctx, 0) == -1  # no eventfd yet: ENOENT
        assert ctypes.get_errno() == 2
        assert lib.vfu_get_poll_fd(ctx) >= 0
        assert os.stat(path)
    finally:
        lib.vfu_destroy_ctx(ctx)
    assert not os.path.exists(path)  # the library unlinks its socket
