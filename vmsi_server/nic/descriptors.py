"""82576 descriptor layouts, declared as data (igbvf ``vf.h``; reference/igbvf.md §7).

All descriptors are 16 bytes, little-endian. The hot paths unpack with the ``Struct``
objects directly; the ``NamedTuple`` classes give the same layouts names for building
rings in tests and for debugging.

TX descriptor kinds are told apart by dword 2 (bytes 8-11): DEXT (bit 29) clear means
a legacy descriptor; with DEXT set, DTYP (bits 23:20) is 2 for a context descriptor
and 3 for a data descriptor. Anything else is invalid.

Legacy TX descriptors are accepted as plain data descriptors: they carry the same
length / EOP / RS bits in the same places, IC (bit 26) is honoured with CSS/CSO as a
partial checksum (the same semantics as the vnet header's NEEDS_CSUM) and VLE inserts
the ``special`` field as 802.1Q tag. igbvf never emits them.
"""

from __future__ import annotations

import enum
import struct
from array import array
from typing import NamedTuple

DESC_SIZE = 16
RING_ALIGN = 128
"""TDLEN/RDLEN must be a multiple of 128 bytes; the ring base must be 128-byte aligned."""
MAX_RING_BYTES = 1 << 20
"""TDLEN/RDLEN bits 19:7: at most 64 Ki descriptors (1 MiB - 128 usable)."""

# --- TX: dword 2 (cmd_type_len / type_tucmd_mlhl) -------------------------------------
TXD_DTALEN_MASK = 0x0000FFFF
TXD_DTYP_MASK = 0x00F00000
TXD_DTYP_CTXT = 0x00200000
TXD_DTYP_DATA = 0x00300000
TXD_CMD_EOP = 0x01000000
TXD_CMD_IFCS = 0x02000000
TXD_CMD_IC = 0x04000000
"""Legacy only: insert checksum (CSS/CSO)."""
TXD_CMD_RS = 0x08000000
TXD_CMD_DEXT = 0x20000000
TXD_CMD_VLE = 0x40000000
TXD_CMD_TSE = 0x80000000

# --- TX: context descriptor fields ----------------------------------------------------
CTX_IPLEN_MASK = 0x1FF
CTX_MACLEN_SHIFT = 9
CTX_MACLEN_MASK = 0x7F
CTX_VLAN_SHIFT = 16
TUCMD_IPV4 = 0x00000400
TUCMD_L4T_MASK = 0x00001800
TUCMD_L4T_UDP = 0x00000000
TUCMD_L4T_TCP = 0x00000800
TUCMD_L4T_SCTP = 0x00001000
CTX_L4LEN_SHIFT = 8
CTX_L4LEN_MASK = 0xFF
CTX_MSS_SHIFT = 16

# --- TX: data descriptor dword 3 (olinfo_status) / write-back status -------------------
TXD_POPTS_IXSM = 0x00000100
TXD_POPTS_TXSM = 0x00000200
TXD_PAYLEN_SHIFT = 14
TXD_STAT_DD = 0x00000001

# --- RX -------------------------------------------------------------------------------
SRRCTL_BSIZEPKT_MASK = 0x7F
"""Packet buffer size in KiB units; 0 means the 2 KiB default."""
SRRCTL_DESCTYPE_MASK = 0x0E000000
SRRCTL_DESCTYPE_LEGACY = 0x00000000
SRRCTL_DESCTYPE_ADV_ONEBUF = 0x02000000
SRRCTL_DESCTYPE_HDR_SPLIT_ALWAYS = 0x0A000000
SRRCTL_DROP_EN = 0x80000000
RXDCTL_ENABLE = 0x02000000
TXDCTL_ENABLE = 0x02000000

RXD_STAT_DD = 0x01
RXD_STAT_EOP = 0x02
RXD_STAT_IXSM = 0x04
RXD_STAT_VP = 0x08
RXD_STAT_UDPCS = 0x10
RXD_STAT_TCPCS = 0x20
RXD_STAT_IPCS = 0x40
RXD_ERR_TCPE = 0x2000_0000
"""TCP/UDP checksum error (advanced write-back status_error bit 29)."""
RXD_ERR_IPE = 0x4000_0000
"""IPv4 header checksum error (bit 30)."""
RXD_ERR_RXE = 0x80000000
"""RX data error (bit 31): igbvf drops the frame and recycles the buffer."""


class TxKind(enum.IntEnum):
    LEGACY = 0
    CONTEXT = 1
    DATA = 2
    INVALID = 3


def tx_kind(dword2: int) -> TxKind:
    if not dword2 & TXD_CMD_DEXT:
        return TxKind.LEGACY
    dtyp = dword2 & TXD_DTYP_MASK
    if dtyp == TXD_DTYP_DATA:
        return TxKind.DATA
    if dtyp == TXD_DTYP_CTXT:
        return TxKind.CONTEXT
    return TxKind.INVALID


TX_DESC = struct.Struct("<QII")
"""Any TX descriptor as (qword 0, dword 2, dword 3): enough to classify it."""

TX_CTX_DESC = struct.Struct("<IIII")
"""Advanced TX context descriptor::

    struct e1000_adv_tx_context_desc {
        __le32 vlan_macip_lens;  /* IPLEN 8:0, MACLEN 15:9, VLAN tag 31:16 */
        __le32 seqnum_seed;      /* 0 */
        __le32 type_tucmd_mlhl;  /* DEXT | DTYP_CTXT | TUCMD (IPV4, L4T) */
        __le32 mss_l4len_idx;    /* IDX 6:4, L4LEN 15:8, MSS 31:16 */
    };
"""


class TxContextDesc(NamedTuple):
    vlan_macip_lens: int = 0
    seqnum_seed: int = 0
    type_tucmd_mlhl: int = TXD_CMD_DEXT | TXD_DTYP_CTXT
    mss_l4len_idx: int = 0

    @classmethod
    def build(cls, maclen: int, iplen: int, tucmd: int = 0, l4len: int = 0, mss: int = 0,
              vlan: int = 0) -> TxContextDesc:
        return cls((vlan << CTX_VLAN_SHIFT) | (maclen << CTX_MACLEN_SHIFT) | iplen, 0,
                   TXD_CMD_DEXT | TXD_DTYP_CTXT | tucmd,
                   (mss << CTX_MSS_SHIFT) | (l4len << CTX_L4LEN_SHIFT))

    def pack(self) -> bytes:
        return TX_CTX_DESC.pack(*self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> TxContextDesc:
        return cls._make(TX_CTX_DESC.unpack_from(data, offset))

    @property
    def iplen(self) -> int:
        return self.vlan_macip_lens & CTX_IPLEN_MASK

    @property
    def maclen(self) -> int:
        return (self.vlan_macip_lens >> CTX_MACLEN_SHIFT) & CTX_MACLEN_MASK

    @property
    def vlan(self) -> int:
        return self.vlan_macip_lens >> CTX_VLAN_SHIFT

    @property
    def tucmd(self) -> int:
        return self.type_tucmd_mlhl & (TUCMD_IPV4 | TUCMD_L4T_MASK)

    @property
    def l4len(self) -> int:
        return (self.mss_l4len_idx >> CTX_L4LEN_SHIFT) & CTX_L4LEN_MASK

    @property
    def mss(self) -> int:
        return self.mss_l4len_idx >> CTX_MSS_SHIFT


TX_DATA_DESC = struct.Struct("<QII")
"""Advanced TX data descriptor (read format)::

    struct e1000_adv_tx_desc_read {
        __le64 buffer_addr;    /* guest-physical address of the data */
        __le32 cmd_type_len;   /* DTALEN 15:0 | DTYP_DATA | DCMD (EOP IFCS RS DEXT VLE TSE) */
        __le32 olinfo_status;  /* POPTS (IXSM 8, TXSM 9) | PAYLEN 31:14 */
    };

Write-back: the device sets DD (bit 0) in ``olinfo_status`` (``wb.status``).
"""


class TxDataDesc(NamedTuple):
    buffer_addr: int
    cmd_type_len: int
    olinfo_status: int = 0

    @classmethod
    def build(cls, addr: int, length: int, *, eop: bool = True, rs: bool = True,
              tse: bool = False, vle: bool = False, popts: int = 0,
              paylen: int | None = None) -> TxDataDesc:
        cmd = TXD_CMD_DEXT | TXD_DTYP_DATA | TXD_CMD_IFCS | (length & TXD_DTALEN_MASK)
        cmd |= (TXD_CMD_EOP if eop else 0) | (TXD_CMD_RS if rs else 0)
        cmd |= (TXD_CMD_TSE if tse else 0) | (TXD_CMD_VLE if vle else 0)
        pl = length if paylen is None else paylen
        return cls(addr, cmd, (pl << TXD_PAYLEN_SHIFT) | popts)

    def pack(self) -> bytes:
        return TX_DATA_DESC.pack(*self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> TxDataDesc:
        return cls._make(TX_DATA_DESC.unpack_from(data, offset))

    @property
    def length(self) -> int:
        return self.cmd_type_len & TXD_DTALEN_MASK

    @property
    def dd(self) -> bool:
        return bool(self.olinfo_status & TXD_STAT_DD)


TX_LEGACY_DESC = struct.Struct("<QHBBBBH")
"""Legacy TX descriptor::

    struct e1000_tx_desc {
        __le64 buffer_addr;
        __le16 length;
        u8 cso;      /* checksum offset (IC) */
        u8 cmd;      /* EOP 0x01 IFCS 0x02 IC 0x04 RS 0x08 DEXT 0x20 (clear) VLE 0x40 */
        u8 status;   /* DD 0x01, written back */
        u8 css;      /* checksum start (IC) */
        __le16 special;  /* VLAN tag (VLE) */
    };
"""
LEGACY_STATUS_OFFSET = 12


class TxLegacyDesc(NamedTuple):
    buffer_addr: int
    length: int
    cso: int = 0
    cmd: int = (TXD_CMD_EOP | TXD_CMD_RS | TXD_CMD_IFCS) >> 24
    status: int = 0
    css: int = 0
    special: int = 0

    def pack(self) -> bytes:
        return TX_LEGACY_DESC.pack(*self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> TxLegacyDesc:
        return cls._make(TX_LEGACY_DESC.unpack_from(data, offset))


RX_READ_DESC = struct.Struct("<QQ")
"""Advanced RX descriptor, read format (written by the driver)::

    struct { __le64 pkt_addr; __le64 hdr_addr; /* 0 in one-buffer mode */ } read;
"""


class RxReadDesc(NamedTuple):
    pkt_addr: int
    hdr_addr: int = 0

    def pack(self) -> bytes:
        return RX_READ_DESC.pack(*self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> RxReadDesc:
        return cls._make(RX_READ_DESC.unpack_from(data, offset))


RX_WB_DESC = struct.Struct("<HHIIHH")
"""Advanced RX descriptor, write-back format (written by the device)::

    struct {
        __le16 pkt_info;      /* RSS type, packet type: 0 */
        __le16 hdr_info;      /* header split only: 0 */
        __le32 rss;           /* RSS hash or ip_id + csum: 0 */
        __le32 status_error;  /* DD 0x1 | EOP 0x2 | ...; errors in 31:20 */
        __le16 length;        /* frame length without FCS */
        __le16 vlan;          /* tag when VP */
    } wb;
"""


class RxWritebackDesc(NamedTuple):
    pkt_info: int
    hdr_info: int
    rss: int
    status_error: int
    length: int
    vlan: int

    def pack(self) -> bytes:
        return RX_WB_DESC.pack(*self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> RxWritebackDesc:
        return cls._make(RX_WB_DESC.unpack_from(data, offset))


class RingPointers:
    """A queue's head and tail, kept in one buffer (``ring``) that the compiled hot
    path (``fastlane/vf.c``, ``VL_RING_HEAD``/``VL_RING_TAIL``) reads and advances
    in place, so both sides always see the same pointers."""

    def __init__(self) -> None:
        self.ring = array("I", [0, 0])

    @property
    def head(self) -> int:
        return self.ring[0]

    @head.setter
    def head(self, value: int) -> None:
        self.ring[0] = value

    @property
    def tail(self) -> int:
        return self.ring[1]

    @tail.setter
    def tail(self, value: int) -> None:
        self.ring[1] = value


def ring_slots(bal: int, bah: int, length: int) -> tuple[int, int]:
    """(ring base, descriptor count) for ring registers, or (0, 0) if they are invalid:
    base not 128-byte aligned, length 0, not a multiple of 128, or above 1 MiB."""
    base = ((bah & 0xFFFFFFFF) << 32) | (bal & 0xFFFFFFFF)
    if base % RING_ALIGN or length <= 0 or length % RING_ALIGN or length > MAX_RING_BYTES:
        return 0, 0
    return base, length // DESC_SIZE
