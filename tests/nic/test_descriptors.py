"""Descriptor layouts: byte positions against the datasheet tables, round trips, ring checks."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.nic import descriptors as d
from vmsi_server.nic.descriptors import (
    RxReadDesc,
    RxWritebackDesc,
    TxContextDesc,
    TxDataDesc,
    TxKind,
    TxLegacyDesc,
    ring_slots,
    tx_kind,
)


def test_context_descriptor_layout() -> None:
    ctx = TxContextDesc.build(maclen=14, iplen=20, tucmd=d.TUCMD_IPV4 | d.TUCMD_L4T_TCP,
                              l4len=32, mss=1448, vlan=0x0123)
    raw = ctx.pack()
    assert len(raw) == 16
    assert raw == struct.pack("<IIII", (0x0123 << 16) | (14 << 9) | 20, 0,
                              0x20000000 | 0x00200000 | 0x400 | 0x800, (1448 << 16) | (32 << 8))
    back = TxContextDesc.unpack(raw)
    assert back == ctx
    assert (back.maclen, back.iplen, back.vlan, back.l4len, back.mss) == (14, 20, 0x123, 32, 1448)
    assert back.tucmd == d.TUCMD_IPV4 | d.TUCMD_L4T_TCP
    assert tx_kind(back.type_tucmd_mlhl) is TxKind.CONTEXT


def test_data_descriptor_layout() -> None:
    desc = TxDataDesc.build(0x1122334455667788, 1514, tse=True, vle=True,
                            popts=d.TXD_POPTS_TXSM | d.TXD_POPTS_IXSM, paylen=1000)
    raw = desc.pack()
    assert raw[:8] == (0x1122334455667788).to_bytes(8, "little")
    cmd, olinfo = struct.unpack_from("<II", raw, 8)
    assert cmd & 0xFFFF == 1514
    assert cmd & 0x00F00000 == 0x00300000
    for bit in (0x01000000, 0x02000000, 0x08000000, 0x20000000, 0x40000000, 0x80000000):
        assert cmd & bit, hex(bit)
    assert olinfo == (1000 << 14) | 0x300
    back = TxDataDesc.unpack(raw)
    assert back == desc and back.length == 1514 and not back.dd
    assert tx_kind(cmd) is TxKind.DATA
    no_eop = TxDataDesc.build(0, 10, eop=False, rs=False)
    assert not no_eop.cmd_type_len & (d.TXD_CMD_EOP | d.TXD_CMD_RS)


def test_legacy_descriptor_layout() -> None:
    desc = TxLegacyDesc(0xABC000, 60, cso=40, cmd=0x0B | 0x04, css=34, special=0x0064)
    raw = desc.pack()
    assert struct.unpack_from("<H", raw, 8)[0] == 60
    assert raw[10] == 40 and raw[11] == 0x0F and raw[12] == 0 and raw[13] == 34
    assert struct.unpack_from("<H", raw, 14)[0] == 0x64
    dword2 = struct.unpack_from("<I", raw, 8)[0]
    assert tx_kind(dword2) is TxKind.LEGACY
    assert dword2 & d.TXD_CMD_EOP and dword2 & d.TXD_CMD_RS and dword2 & d.TXD_CMD_IC
    assert TxLegacyDesc.unpack(raw) == desc


@pytest.mark.parametrize("dtyp", [0x0, 0x1, 0x4, 0xF])
def test_invalid_dtyp(dtyp: int) -> None:
    assert tx_kind(d.TXD_CMD_DEXT | (dtyp << 20)) is TxKind.INVALID


def test_rx_read_and_writeback_layout() -> None:
    rd = RxReadDesc(0xDEADBEEF000, 0)
    raw = rd.pack()
    assert raw == (0xDEADBEEF000).to_bytes(8, "little") + bytes(8)
    assert RxReadDesc.unpack(raw) == rd
    wb = RxWritebackDesc(0, 0, 0, d.RXD_STAT_DD | d.RXD_STAT_EOP, 1514, 0)
    raw = wb.pack()
    assert struct.unpack_from("<I", raw, 8)[0] == 3
    assert struct.unpack_from("<H", raw, 12)[0] == 1514
    assert raw[14:16] == b"\0\0" and raw[:8] == bytes(8)
    assert RxWritebackDesc.unpack(raw) == wb


@pytest.mark.parametrize(("bal", "bah", "length", "expect"), [
    (0x1000, 0, 16384, (0x1000, 1024)),
    (0x80, 0x1, 128, (0x1_0000_0080, 8)),
    (0x1040, 0, 128, (0, 0)),          # base not 128-byte aligned
    (0x1000, 0, 0, (0, 0)),            # length 0
    (0x1000, 0, 200, (0, 0)),          # not a multiple of 128
    (0x1000, 0, 2 << 20, (0, 0)),      # absurd size
    (0x1000, 0, 1 << 20, (0x1000, 65536)),
])
def test_ring_slots(bal: int, bah: int, length: int, expect: tuple[int, int]) -> None:
    assert ring_slots(bal, bah, length) == expect
