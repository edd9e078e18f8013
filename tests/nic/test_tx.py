"""TxQueue with real guest memory and the loop backend: what reaches the wire, the
vnet header a tap would get, DD write-back, TDH movement."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from test_descriptors_helpers import (
    DST4,
    DST6,
    SRC4,
    SRC6,
    Guest,
    assert_only_changed,
    enable_tx,
    ipv4_fixed,
    ipv4_header_ok,
    ipv4_tcp,
    ipv4_udp,
    ipv6_tcp,
    l4_ok,
    payload_bytes,
    ref_sum,
)

from vmsi_server.nic import descriptors as d
from vmsi_server.nic import offload as o
from vmsi_server.nic.backend.loop import LoopBackend
from vmsi_server.nic.descriptors import TxContextDesc, TxDataDesc, TxLegacyDesc
from vmsi_server.nic.stats import VfStats
from vmsi_server.nic.tx import TxQueue

V4_TCP = d.TUCMD_IPV4 | d.TUCMD_L4T_TCP
V4_UDP = d.TUCMD_IPV4 | d.TUCMD_L4T_UDP
V6_TCP = d.TUCMD_L4T_TCP
TXSM = d.TXD_POPTS_TXSM
IXSM = d.TXD_POPTS_IXSM


class TxRig:
    """A TX ring of ``count`` descriptors in guest memory and a queue on it."""

    def __init__(self, guest: Guest, vnet: bool, count: int = 64) -> None:
        self.guest = guest
        self.backend = LoopBackend(vnet_hdr=vnet)
        self.stats = VfStats()
        self.count = count
        self.ring = guest.alloc(count * 16)
        self.q = TxQueue(lambda: guest.memory, self.backend, self.stats)
        enable_tx(self.q, self.ring, count)
        self.slot = 0

    def put(self, desc: bytes) -> int:
        slot = self.slot
        self.guest.write(self.ring + slot * 16, desc)
        self.slot = (slot + 1) % self.count
        return slot

    def buf(self, data: bytes) -> int:
        addr = self.guest.alloc(len(data), align=2)
        self.guest.write(addr, data)
        return addr

    def data(self, chunks: list[bytes], *, tse: bool = False, vle: bool = False, popts: int = 0,
             rs_last: bool = True, paylen: int | None = None) -> list[int]:
        total = sum(len(c) for c in chunks)
        slots = []
        for i, c in enumerate(chunks):
            last = i == len(chunks) - 1
            slots.append(self.put(TxDataDesc.build(
                self.buf(c), len(c), eop=last, rs=last and rs_last, tse=tse, vle=vle,
                popts=popts if i == 0 else 0, paylen=total if paylen is None else paylen,
            ).pack()))
        return slots

    def doorbell(self) -> int:
        self.q.tail = self.slot
        return self.q.doorbell()

    def desc(self, slot: int) -> bytes:
        return self.guest.read(self.ring + slot * 16, 16)

    def dd(self, slot: int) -> bool:
        return bool(self.desc(slot)[12] & 1)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


@pytest.fixture(params=[False, True], ids=["software", "vnet"])
def rig(request: pytest.FixtureRequest, guest: Guest) -> TxRig:
    return TxRig(guest, vnet=request.param)


def test_single_descriptor_packet(rig: TxRig) -> None:
    frame = ipv4_fixed(ipv4_udp(payload_bytes(200)))
    (slot,) = rig.data([frame])
    assert rig.doorbell() == 1
    assert rig.backend.sent == [frame]
    assert rig.q.head == rig.q.tail == 1
    assert rig.dd(slot)
    assert (rig.stats.gptc, rig.stats.gotc) == (1, len(frame))
    if rig.backend.vnet_hdr:
        assert rig.backend.sent_vnet == [(o.ZERO_VNET_HDR, frame)]


def test_multi_descriptor_packet_dd_only_on_rs(rig: TxRig) -> None:
    frame = ipv4_fixed(ipv4_udp(payload_bytes(1400)))
    chunks = [frame[:54], frame[54:700], frame[700:]]
    slots = rig.data(chunks)
    before = [rig.desc(s) for s in slots]
    assert rig.doorbell() == 1
    assert rig.backend.sent == [frame]
    assert [rig.dd(s) for s in slots] == [False, False, True]
    assert [rig.desc(s) for s in slots[:2]] == before[:2]  # untouched
    assert rig.q.head == 3


def test_dd_written_only_where_rs(rig: TxRig) -> None:
    frames = [ipv4_fixed(ipv4_udp(payload_bytes(60 + i))) for i in range(3)]
    a = rig.data([frames[0]], rs_last=False)
    b = rig.data([frames[1]], rs_last=True)
    c = rig.data([frames[2]], rs_last=False)
    assert rig.doorbell() == 1
    assert rig.backend.sent == frames
    assert (rig.dd(a[0]), rig.dd(b[0]), rig.dd(c[0])) == (False, True, False)
    assert rig.q.head == 3


def test_advanced_dd_writeback_is_the_status_dword(rig: TxRig) -> None:
    frame = ipv4_fixed(ipv4_udp(b"z" * 30))
    (slot,) = rig.data([frame])
    before = rig.desc(slot)
    rig.doorbell()
    raw = rig.desc(slot)
    assert struct.unpack_from("<I", raw, 12)[0] == d.TXD_STAT_DD
    assert raw[:12] == before[:12]  # address and command left alone


def test_head_wraps(guest: Guest) -> None:
    rig = TxRig(guest, vnet=False, count=8)
    sent = []
    for i in range(21):
        frame = ipv4_fixed(ipv4_udp(payload_bytes(100 + i, seed=i)))
        # every third packet in three descriptors, so some chains cross the ring end
        chunks = [frame[:40], frame[40:90], frame[90:]] if i % 3 == 0 else [frame]
        rig.data(chunks)
        assert rig.doorbell() == 1
        sent.append(frame)
        assert rig.q.head == rig.q.tail == rig.slot
    assert rig.backend.sent == sent
    assert rig.stats.gptc == 21


def test_several_packets_one_doorbell(rig: TxRig) -> None:
    frames = [ipv4_fixed(ipv4_udp(payload_bytes(100, seed=i))) for i in range(5)]
    for f in frames:
        rig.data([f[:20], f[20:]])
    assert rig.doorbell() == 5
    assert rig.backend.sent == frames
    assert rig.q.head == 10


def _ctx(rig: TxRig, maclen: int, iplen: int, tucmd: int, l4len: int = 0, mss: int = 0,
         vlan: int = 0) -> int:
    return rig.put(TxContextDesc.build(maclen, iplen, tucmd, l4len, mss, vlan).pack())


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_tso(rig: TxRig, v6: bool) -> None:
    payload = payload_bytes(64000)
    frame = ipv6_tcp(payload, tso=True) if v6 else ipv4_tcp(payload, tso=True)
    l4 = 54 if v6 else 34
    mss = 1448
    _ctx(rig, 14, l4 - 14, V6_TCP if v6 else V4_TCP, 20, mss)
    # linear part (headers + some data) and page-sized fragments, like an skb
    chunks = [frame[:l4 + 20 + 100]] + [frame[i:i + 4096]
                                          for i in range(l4 + 120, len(frame), 4096)]
    slots = rig.data(chunks, tse=True, popts=TXSM | (0 if v6 else IXSM),
                     paylen=len(payload))
    assert rig.doorbell() == 1
    assert rig.q.head == len(slots) + 1 == rig.q.tail and rig.dd(slots[-1])
    nseg = -(-64000 // mss)
    segs = rig.backend.sent
    assert len(segs) == nseg
    assert b"".join(s[l4 + 20:] for s in segs) == payload
    for i, s in enumerate(segs):
        assert l4_ok(s, 14), f"segment {i}"
        if not v6:
            assert ipv4_header_ok(s[14:34])
        assert len(s) - l4 - 20 == min(mss, 64000 - i * mss)
    assert rig.stats.gptc == nseg
    assert rig.stats.gotc == sum(len(s) for s in segs)
    if rig.backend.vnet_hdr:
        ((hdr, sup),) = rig.backend.sent_vnet
        assert o.VnetHdr.unpack(hdr) == o.VnetHdr(
            o.VNET_F_NEEDS_CSUM, o.GSO_TCPV6 if v6 else o.GSO_TCPV4, l4 + 20, mss, l4, 16)
        assert len(sup) == len(frame) and sup[l4 + 20:] == payload
        l4_total = len(frame) - l4
        if v6:
            assert struct.unpack_from(">H", sup, 18)[0] == l4_total
            pseudo = ref_sum(SRC6 + DST6 + struct.pack(">IxxxB", l4_total, 6))
        else:
            assert struct.unpack_from(">H", sup, 16)[0] == len(frame) - 14
            assert ipv4_header_ok(sup[14:34])
            pseudo = ref_sum(SRC4 + DST4 + struct.pack(">BBH", 0, 6, l4_total))
        # the length was added back: the length-inclusive pseudo-header sum
        assert struct.unpack_from(">H", sup, l4 + 16)[0] == pseudo


@pytest.mark.parametrize(("udp", "tucmd", "csum_off"), [(False, V4_TCP, 16), (True, V4_UDP, 6)],
                         ids=["tcp", "udp"])
def test_checksum_only(rig: TxRig, udp: bool, tucmd: int, csum_off: int) -> None:
    frame = ipv4_udp(payload_bytes(999)) if udp else ipv4_fixed(ipv4_tcp(payload_bytes(999)))
    _ctx(rig, 14, 20, tucmd)
    rig.data([frame[:100], frame[100:]], popts=TXSM)
    assert rig.doorbell() == 1
    (out,) = rig.backend.sent
    assert l4_ok(out, 14)
    assert out[:34 + csum_off] == frame[:34 + csum_off]
    assert out[34 + csum_off + 2:] == frame[34 + csum_off + 2:]
    if rig.backend.vnet_hdr:
        ((hdr, raw),) = rig.backend.sent_vnet
        assert o.VnetHdr.unpack(hdr) == o.VnetHdr(o.VNET_F_NEEDS_CSUM, 0, 0, 0, 34, csum_off)
        assert raw == frame  # the partial sum goes to the kernel as it is


def test_checksum_only_ipv6(rig: TxRig) -> None:
    frame = ipv6_tcp(payload_bytes(500))
    _ctx(rig, 14, 40, V6_TCP)
    rig.data([frame], popts=TXSM)
    rig.doorbell()
    (out,) = rig.backend.sent
    assert l4_ok(out, 14)


def test_ixsm_fixes_ipv4_header_checksum(rig: TxRig) -> None:
    frame = bytearray(ipv4_udp(payload_bytes(50)))
    frame[24:26] = b"\0\0"
    _ctx(rig, 14, 20, V4_UDP)
    rig.data([bytes(frame)], popts=IXSM)
    rig.doorbell()
    (out,) = rig.backend.sent
    assert ipv4_header_ok(out[14:34])
    assert out[:24] == frame[:24] and out[26:] == frame[26:]


def test_vlan_insertion_with_checksum(rig: TxRig) -> None:
    frame = ipv4_fixed(ipv4_tcp(payload_bytes(300)))
    _ctx(rig, 14, 20, V4_TCP, vlan=0x0064)
    rig.data([frame], vle=True, popts=TXSM)
    rig.doorbell()
    (out,) = rig.backend.sent
    assert out[:12] == frame[:12] and out[12:16] == b"\x81\x00\x00\x64"
    assert out[16:16 + 20] == frame[12:32]
    assert l4_ok(out, 18)
    assert rig.stats.gotc == len(frame) + 4


def test_vlan_tso(rig: TxRig) -> None:
    payload = payload_bytes(5000)
    frame = ipv4_tcp(payload, tso=True)
    _ctx(rig, 14, 20, V4_TCP, 20, 1000, vlan=7)
    rig.data([frame], tse=True, vle=True, popts=TXSM | IXSM)
    rig.doorbell()
    segs = rig.backend.sent
    assert len(segs) == 5
    for s in segs:
        assert s[12:16] == b"\x81\x00\x00\x07" and l4_ok(s, 18) and ipv4_header_ok(s[18:38])
    if rig.backend.vnet_hdr:
        hdr = o.VnetHdr.unpack(rig.backend.sent_vnet[0][0])
        assert (hdr.csum_start, hdr.hdr_len) == (38, 58)


def test_sctp_crc32c_in_software(rig: TxRig) -> None:
    chunk = payload_bytes(64)
    ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + 12 + len(chunk), 1, 0, 64, 132, 0,
                               SRC4, DST4))
    sctp = struct.pack(">HHII", 1, 2, 0x1234, 0xFFFFFFFF) + chunk
    frame = ipv4_fixed(bytes(rig_eth()) + bytes(ip) + sctp)
    _ctx(rig, 14, 20, d.TUCMD_IPV4 | d.TUCMD_L4T_SCTP)
    rig.data([frame[:40], frame[40:]], popts=TXSM)
    rig.doorbell()
    (out,) = rig.backend.sent
    crc = struct.unpack_from("<I", out, 34 + 8)[0]
    assert crc == o.crc32c([out[34:42], b"\0\0\0\0", out[46:]])
    assert crc != 0xFFFFFFFF
    assert out[:42] == frame[:42] and out[46:] == frame[46:]


def rig_eth() -> bytes:
    return bytes.fromhex("020000000002020000000001") + b"\x08\x00"


def test_legacy_descriptors(rig: TxRig) -> None:
    plain = ipv4_fixed(ipv4_udp(payload_bytes(80)))
    a = rig.put(TxLegacyDesc(rig.buf(plain), len(plain)).pack())
    seeded = ipv4_udp(payload_bytes(90))
    ic = 0x01 | 0x02 | 0x04 | 0x08
    b = rig.put(TxLegacyDesc(rig.buf(seeded), len(seeded), cso=40, cmd=ic, css=34).pack())
    assert rig.doorbell() == 2
    assert rig.backend.sent[0] == plain
    assert l4_ok(rig.backend.sent[1], 14)
    # legacy DD is the status byte only; CSS and special are kept
    assert rig.desc(a)[12] == 1 and rig.desc(b)[12] == 1 and rig.desc(b)[13] == 34


def test_disabled_queue_does_nothing(rig: TxRig) -> None:
    rig.q.txdctl = 0
    rig.data([ipv4_udp(b"x")])
    assert rig.doorbell() == 0
    assert rig.backend.sent == [] and rig.q.head == 0


def test_reset_forgets_context(rig: TxRig) -> None:
    _ctx(rig, 14, 20, V4_TCP)
    rig.doorbell()
    rig.q.reset()
    assert (rig.q.head, rig.q.tail, rig.q.len, rig.q.txdctl) == (0, 0, 0, 0)
    enable_tx(rig.q, rig.ring, rig.count)
    rig.slot = 0
    (slot,) = rig.data([ipv4_tcp(b"x" * 10)], popts=TXSM)
    assert rig.doorbell() == 1  # completed although dropped
    assert rig.backend.sent == [] and rig.dd(slot)
    assert rig.stats.drops == {"tx_no_context": 1}


def test_zero_copy_handoff(guest: Guest) -> None:
    """The tap gets guest-memory views; a TSO packet only a copied header in front."""
    seen: list[tuple[bytes, list[object]]] = []

    class Spy(LoopBackend):
        def send(self, vnet_hdr: bytes, parts: object) -> None:  # type: ignore[override]
            seen.append((vnet_hdr, list(parts)))  # type: ignore[call-overload]

    rig = TxRig(guest, vnet=True)
    rig.backend = Spy(vnet_hdr=True)
    rig.q.backend = rig.backend
    frame = ipv4_fixed(ipv4_udp(payload_bytes(1000)))
    rig.data([frame[:500], frame[500:]])
    payload = payload_bytes(20000)
    tso = ipv4_tcp(payload, tso=True)
    _ctx(rig, 14, 20, V4_TCP, 20, 1448)
    rig.data([tso[:54], tso[54:10054], tso[10054:]], tse=True, popts=TXSM | IXSM)
    rig.doorbell()
    (h1, p1), (h2, p2) = seen
    assert h1 == o.ZERO_VNET_HDR and o.VnetHdr.unpack(h2).gso_type == o.GSO_TCPV4
    assert all(type(p) is memoryview and p.readonly for p in p1)
    assert [len(p) for p in p1] == [500, len(frame) - 500]
    assert type(p2[0]) is bytearray and len(p2[0]) == 54
    assert all(type(p) is memoryview for p in p2[1:])
    assert sum(len(p) for p in p2[1:]) == 20000  # type: ignore[arg-type]


def test_only_descriptors_written(guest: Guest) -> None:
    rig = TxRig(guest, vnet=False)
    before = guest.snapshot()
    frame = ipv4_tcp(payload_bytes(3000), tso=True)
    _ctx(rig, 14, 20, V4_TCP, 20, 1000)
    rig.data([frame[:54], frame[54:]], tse=True, popts=TXSM | IXSM)
    ring_writes = guest.snapshot()
    rig.doorbell()
    assert len(rig.backend.sent) == 3
    assert_only_changed(guest, ring_writes, [(rig.ring + 2 * 16 + 12, rig.ring + 2 * 16 + 16)])
    assert before != ring_writes
