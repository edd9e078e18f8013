"""TxQueue against guest garbage: every case drops and counts, never raises, never
writes outside the ring's DD bytes, and leaves TDH where hardware would."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest
from test_descriptors_helpers import (
    Guest,
    assert_only_changed,
    ipv4_fixed,
    ipv4_tcp,
    ipv4_udp,
    ipv6_tcp,
    payload_bytes,
)
from test_tx import TxRig

from vmsi_server.nic import descriptors as d
from vmsi_server.nic.descriptors import TxContextDesc, TxDataDesc
from vmsi_server.nic.tx import MAX_CHAIN, TxQueue

V4_TCP = d.TUCMD_IPV4 | d.TUCMD_L4T_TCP
TSO_POPTS = d.TXD_POPTS_TXSM | d.TXD_POPTS_IXSM


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


@pytest.fixture
def rig(guest: Guest) -> TxRig:
    return TxRig(guest, vnet=False, count=128)


def good_frame(seed: int = 0) -> bytes:
    return ipv4_fixed(ipv4_udp(payload_bytes(100, seed)))


def dd_bytes(rig: TxRig, *slots: int) -> list[tuple[int, int]]:
    return [(rig.ring + s * 16 + 12, rig.ring + s * 16 + 16) for s in slots]


def run(rig: TxRig, allowed_slots: list[int]) -> int:
    """Doorbell; assert only the DD bytes of ``allowed_slots`` changed in guest memory."""
    before = rig.guest.snapshot()
    done = rig.doorbell()
    assert_only_changed(rig.guest, before, dd_bytes(rig, *allowed_slots))
    assert "tx_internal_error" not in rig.stats.drops
    return done


# -- ring registers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("setup", "reason"), [
    (lambda q: setattr(q, "bal", q.bal + 64), "tx_ring_invalid"),
    (lambda q: setattr(q, "len", 0), "tx_ring_invalid"),
    (lambda q: setattr(q, "len", 16 * 100), "tx_ring_invalid"),
    (lambda q: setattr(q, "len", 0xFFFFFF80), "tx_ring_invalid"),
    (lambda q: setattr(q, "head", 200), "tx_ring_pointer"),
    (lambda q: setattr(q, "bah", 0x10), "tx_ring_dma"),
    (lambda q: setattr(q, "bal", 0xFFFFFF80), "tx_ring_dma"),
    (lambda q: setattr(q, "_memory", lambda: None), "tx_no_memory"),
])
def test_bad_ring(rig: TxRig, setup: object, reason: str) -> None:
    rig.data([good_frame()])
    setup(rig.q)  # type: ignore[operator]
    head = rig.q.head
    assert run(rig, []) == 0
    assert rig.backend.sent == [] and rig.q.head == head
    assert rig.stats.drops == {reason: 1}


def test_tail_beyond_ring(rig: TxRig) -> None:
    rig.q.tail = 500
    assert rig.q.doorbell() == 0
    assert rig.stats.drops == {"tx_ring_pointer": 1} and rig.q.head == 0


# -- packets that are dropped but completed ------------------------------------------------------


def _then_good(rig: TxRig) -> None:
    """The queue still works: a good packet right after goes out."""
    f = good_frame(99)
    rig.data([f])
    sent = len(rig.backend.sent)
    assert rig.doorbell() == 1
    assert rig.backend.sent[sent:] == [f]


@pytest.mark.parametrize("addr", [0, 0xFFFF_FFFF_FFFF_F000, "end-50"])
def test_buffer_outside_memory(rig: TxRig, guest: Guest, addr: object) -> None:
    a = guest.end - 50 if addr == "end-50" else addr
    slot = rig.put(TxDataDesc.build(a, 100).pack())  # type: ignore[arg-type]
    assert run(rig, [slot]) == 1
    assert rig.backend.sent == [] and rig.dd(slot) and rig.q.head == 1
    assert rig.stats.drops == {"tx_dma": 1}
    _then_good(rig)


def test_zero_length_descriptor(rig: TxRig) -> None:
    f = good_frame()
    slots = [rig.put(TxDataDesc.build(rig.buf(f), 0, eop=False, rs=False).pack()),
             rig.put(TxDataDesc.build(rig.buf(f), len(f)).pack())]
    assert run(rig, slots) == 1
    assert rig.backend.sent == [] and rig.q.head == 2
    assert rig.stats.drops == {"tx_zero_length": 1}
    _then_good(rig)


def test_oversized_frame(rig: TxRig) -> None:
    big = payload_bytes(8000)
    rig.data([big, big])
    assert run(rig, [1]) == 1
    assert rig.backend.sent == [] and rig.stats.drops == {"tx_oversize": 1}
    _then_good(rig)


def test_invalid_descriptor_type(rig: TxRig) -> None:
    f = good_frame()
    bad = TxDataDesc.build(rig.buf(f), len(f))
    slot = rig.put(struct.pack("<QII", bad.buffer_addr,
                               (bad.cmd_type_len & ~d.TXD_DTYP_MASK) | 0x00500000,
                               bad.olinfo_status))
    assert run(rig, [slot]) == 1
    assert rig.backend.sent == [] and rig.stats.drops == {"tx_bad_desc_type": 1}
    _then_good(rig)


def test_context_inside_a_chain(rig: TxRig) -> None:
    f = good_frame()
    rig.put(TxDataDesc.build(rig.buf(f[:40]), 40, eop=False, rs=False).pack())
    rig.put(TxContextDesc.build(14, 20, V4_TCP).pack())
    rig.data([f])
    assert run(rig, [2]) == 1
    assert rig.backend.sent == [f]
    assert rig.stats.drops == {"tx_bad_chain": 1} and rig.q.head == 3


def tso(rig: TxRig, frame: bytes, maclen: int = 14, iplen: int = 20, tucmd: int = V4_TCP,
        l4len: int = 20, mss: int = 1448, popts: int = TSO_POPTS) -> list[int]:
    c = rig.put(TxContextDesc.build(maclen, iplen, tucmd, l4len, mss).pack())
    return [c, *rig.data([frame[:54], frame[54:]], tse=True, popts=popts)]


@pytest.mark.parametrize(("kw", "reason"), [
    ({"mss": 0}, "tx_tso_invalid"),
    ({"mss": 10}, "tx_tso_invalid"),
    ({"mss": 65535}, "tx_tso_invalid"),
    ({"l4len": 0}, "tx_tso_invalid"),
    ({"l4len": 200}, "tx_tso_invalid"),          # header beyond what TCP allows
    ({"l4len": 24}, "tx_tso_invalid"),           # disagrees with the TCP data offset
    ({"maclen": 0}, "tx_bad_context"),
    ({"maclen": 127, "iplen": 511}, "tx_tso_invalid"),  # no IPv4 header where it says
    ({"tucmd": d.TUCMD_IPV4 | d.TUCMD_L4T_UDP}, "tx_tso_invalid"),
    ({"tucmd": d.TUCMD_L4T_TCP}, "tx_tso_invalid"),  # says IPv6, frame is IPv4
    ({"iplen": 24}, "tx_tso_invalid"),           # IPLEN != IHL (a tunnel)
])
def test_tso_garbage(rig: TxRig, kw: dict[str, int], reason: str) -> None:
    slots = tso(rig, ipv4_tcp(payload_bytes(5000), tso=True), **kw)
    assert run(rig, [slots[-1]]) == 1
    assert rig.backend.sent == [] and rig.stats.drops == {reason: 1}
    assert rig.q.head == 3
    _then_good(rig)


def test_headers_beyond_the_frame(rig: TxRig) -> None:
    rig.put(TxContextDesc.build(14, 60, V4_TCP, 20, 1448).pack())
    rig.data([good_frame()[:60]], tse=True, popts=TSO_POPTS)
    assert run(rig, [1]) == 1
    assert rig.stats.drops == {"tx_bad_context": 1}
    _then_good(rig)


def test_tso_without_payload(rig: TxRig) -> None:
    frame = ipv4_tcp(b"", tso=True)
    rig.put(TxContextDesc.build(14, 20, V4_TCP, 20, 1448).pack())
    rig.data([frame], tse=True, popts=TSO_POPTS)
    assert run(rig, [1]) == 1
    assert rig.stats.drops == {"tx_tso_invalid": 1}


def test_tso_ipv6_frame_claimed_ipv4(rig: TxRig) -> None:
    slots = tso(rig, ipv6_tcp(payload_bytes(3000), tso=True), iplen=40)
    assert run(rig, [slots[-1]]) == 1
    assert rig.stats.drops == {"tx_tso_invalid": 1}


def test_tso_too_large(rig: TxRig) -> None:
    frame = ipv4_tcp(payload_bytes(65535 - 40 + 1), tso=True)
    rig.put(TxContextDesc.build(14, 20, V4_TCP, 20, 1448).pack())
    rig.data([frame[:32768], frame[32768:]], tse=True, popts=TSO_POPTS)
    assert run(rig, [2]) == 1
    assert rig.stats.drops == {"tx_oversize": 1}


def test_checksum_offset_beyond_frame(rig: TxRig) -> None:
    rig.put(TxContextDesc.build(14, 20, V4_TCP).pack())
    short = good_frame()[:40]  # no room for a TCP checksum field at 34 + 16
    rig.data([short], popts=d.TXD_POPTS_TXSM)
    assert run(rig, [1]) == 1
    assert rig.stats.drops == {"tx_csum_invalid": 1}


# -- chains without EOP ---------------------------------------------------------------------


def test_incomplete_chain_waits_for_the_rest(rig: TxRig) -> None:
    f = ipv4_fixed(ipv4_udp(payload_bytes(300)))
    chunks = [f[:50], f[50:100], f[100:]]
    for c in chunks[:2]:
        rig.put(TxDataDesc.build(rig.buf(c), len(c), eop=False, rs=False).pack())
    assert run(rig, []) == 0
    assert rig.q.head == 0 and rig.backend.sent == [] and rig.stats.drops == {}
    slot = rig.put(TxDataDesc.build(rig.buf(chunks[2]), len(chunks[2])).pack())
    assert run(rig, [slot]) == 1
    assert rig.backend.sent == [f] and rig.q.head == 3


def test_chain_too_long_is_dropped_and_discarded_to_eop(rig: TxRig) -> None:
    junk = rig.buf(b"j" * 64)
    n = MAX_CHAIN + 6
    for i in range(n):
        rig.put(TxDataDesc.build(junk, 64, eop=i == n - 1, rs=i in (10, n - 1)).pack())
    f = good_frame(5)
    rig.data([f])
    assert run(rig, [10, n - 1, n]) == 3
    assert rig.backend.sent == [f]
    assert rig.stats.drops == {"tx_chain_too_long": 1}
    assert rig.q.head == n + 1


def test_discard_continues_across_doorbells(rig: TxRig) -> None:
    junk = rig.buf(b"j" * 64)
    for _ in range(MAX_CHAIN + 2):
        rig.put(TxDataDesc.build(junk, 64, eop=False, rs=False).pack())
    assert run(rig, []) == 0
    assert rig.q.head == MAX_CHAIN + 2  # nothing is left to wait for
    rig.put(TxDataDesc.build(junk, 64, eop=True, rs=True).pack())  # the tail of the junk
    f = good_frame(6)
    rig.data([f])
    assert run(rig, [MAX_CHAIN + 2, MAX_CHAIN + 3]) == 2
    assert rig.backend.sent == [f] and rig.stats.drops == {"tx_chain_too_long": 1}


def test_full_ring_without_eop_is_dropped(guest: Guest) -> None:
    rig = TxRig(guest, vnet=False, count=8)
    junk = rig.buf(b"j" * 64)
    for _ in range(7):
        rig.put(TxDataDesc.build(junk, 64, eop=False, rs=False).pack())
    assert rig.doorbell() == 0
    assert rig.q.head == 7 and rig.stats.drops == {"tx_chain_too_long": 1}


# -- fuzz ------------------------------------------------------------------------------------


def test_fuzzed_rings(guest: Guest) -> None:
    """Random descriptors (mixed with plausible ones) and random pointers: no exception,
    no write outside the DD bytes of the ring, TDH inside the ring, bounded work."""
    rng = random.Random(99)
    count = 64
    rig = TxRig(guest, vnet=False, count=count)
    bufs = [rig.buf(ipv4_tcp(payload_bytes(3000, s), tso=True)) for s in range(4)]
    for _ in range(400):
        for i in range(count):
            r = rng.random()
            if r < 0.3:
                raw = struct.pack("<QII", rng.getrandbits(64), rng.getrandbits(32),
                                  rng.getrandbits(32))
            elif r < 0.5:
                raw = TxContextDesc.build(rng.choice([0, 14, 18, 127]),
                                          rng.choice([0, 20, 40, 511]),
                                          rng.getrandbits(13), rng.getrandbits(8),
                                          rng.getrandbits(16)).pack()
            else:
                raw = TxDataDesc.build(
                    rng.choice(bufs) + rng.randrange(0, 100), rng.randrange(0, 4000),
                    eop=rng.random() < 0.5, rs=rng.random() < 0.5, tse=rng.random() < 0.3,
                    vle=rng.random() < 0.1, popts=rng.getrandbits(2) << 8).pack()
            guest.write(rig.ring + i * 16, raw)
        q = rig.q
        q.head, q.tail = rng.randrange(count + 2), rng.randrange(count + 2)
        head = q.head
        before = guest.snapshot()
        done = q.doorbell()
        assert 0 <= done < count
        allowed = [(rig.ring + i * 16 + 12, rig.ring + i * 16 + 16) for i in range(count)]
        assert_only_changed(guest, before, allowed)
        assert q.head == head if head >= count or q.tail >= count else 0 <= q.head < count
    assert "tx_internal_error" not in rig.stats.drops
    assert rig.stats.gptc > 0 and len(rig.stats.drops) >= 6
    assert all(len(f) <= 9728 for f in rig.backend.sent)


def test_doorbell_never_raises_on_internal_error(rig: TxRig, monkeypatch: pytest.MonkeyPatch,
                                                 ) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(TxQueue, "_packet", boom)
    rig.data([good_frame()])
    assert rig.doorbell() == 0
    assert rig.stats.drops == {"tx_internal_error": 1}
