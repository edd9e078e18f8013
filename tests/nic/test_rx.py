"""RxQueue with real guest memory and the loop backend: write-back, RDH movement,
frame-size limits, a full ring holding frames, and guest garbage."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from test_descriptors_helpers import Guest, assert_only_changed, enable_rx, payload_bytes

from vmsi_server.nic import descriptors as d
from vmsi_server.nic import offload as o
from vmsi_server.nic.backend.loop import LoopBackend
from vmsi_server.nic.descriptors import RxReadDesc, RxWritebackDesc
from vmsi_server.nic.rx import RxQueue
from vmsi_server.nic.stats import VfStats

OK = d.RXD_STAT_DD | d.RXD_STAT_EOP
BUF = 2048


class RxRig:
    def __init__(self, guest: Guest, count: int = 8, vnet: bool = False) -> None:
        self.guest = guest
        self.backend = LoopBackend(vnet_hdr=vnet)
        self.stats = VfStats()
        self.count = count
        self.ring = guest.alloc(count * 16)
        self.bufs = [guest.alloc(BUF) for _ in range(count)]
        self.q = RxQueue(lambda: guest.memory, self.backend, self.stats)
        enable_rx(self.q, self.ring, count)
        for i in range(count):
            self.arm(i)

    def arm(self, slot: int, addr: int | None = None) -> None:
        a = self.bufs[slot] if addr is None else addr
        self.guest.write(self.ring + slot * 16, RxReadDesc(a).pack())

    def give(self, n: int) -> int:
        """Driver refill: hand ``n`` more descriptors to the device, write RDT."""
        self.q.tail = (self.q.tail + n) % self.count
        return self.q.tail_written()

    def wb(self, slot: int) -> RxWritebackDesc:
        return RxWritebackDesc.unpack(self.guest.read(self.ring + slot * 16, 16))

    def frame_at(self, slot: int) -> bytes:
        return self.guest.read(self.bufs[slot], self.wb(slot).length)

    def buffer_ranges(self) -> list[tuple[int, int]]:
        return [(self.ring, self.ring + self.count * 16)] + [(b, b + BUF) for b in self.bufs]


def frame(n: int, dst: bytes = bytes.fromhex("020000000002"), seed: int = 0) -> bytes:
    return dst + bytes.fromhex("020000000001") + b"\x08\x00" + payload_bytes(n - 14, seed)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


@pytest.fixture
def rig(guest: Guest) -> RxRig:
    return RxRig(guest)


def test_delivers_with_writeback(rig: RxRig) -> None:
    f = frame(1514)
    rig.backend.inject(f)
    assert rig.give(7) == 1
    assert rig.wb(0) == RxWritebackDesc(0, 0, 0, OK, 1514, 0)
    assert rig.frame_at(0) == f
    assert rig.q.head == 1
    assert (rig.stats.gprc, rig.stats.gorc, rig.stats.mprc) == (1, 1514, 0)


def test_multicast_and_broadcast_counted(rig: RxRig) -> None:
    rig.q.tail = 7
    rig.backend.inject(frame(60, dst=bytes.fromhex("01005e000001")))
    rig.backend.inject(frame(60, dst=b"\xff" * 6))
    rig.backend.inject(frame(60))
    assert rig.q.poll() == 3
    assert (rig.stats.gprc, rig.stats.mprc) == (3, 2)


def test_head_wraps_with_refill(rig: RxRig) -> None:
    rig.give(7)
    expect = []
    for i in range(30):
        f = frame(60 + i, seed=i)
        expect.append(f)
        rig.backend.inject(f)
        slot = rig.q.head
        assert rig.q.poll() == 1
        assert rig.frame_at(slot) == f and rig.wb(slot).status_error == OK
        assert rig.q.head == (slot + 1) % 8
        rig.arm(slot)  # the driver recycles the buffer
        rig.give(1)
    assert rig.stats.gprc == 30


def test_oversize_dropped_descriptor_reused(rig: RxRig) -> None:
    rig.give(7)
    rig.backend.inject(frame(1523))
    rig.backend.inject(frame(1522, seed=3))
    assert rig.q.poll() == 1
    assert rig.q.head == 1 and rig.frame_at(0) == frame(1522, seed=3)
    assert rig.stats.drops == {"rx_oversize": 1}
    rig.q.max_frame = 1000
    rig.backend.inject(frame(1001))
    rig.backend.inject(frame(1000, seed=4))
    assert rig.q.poll() == 1
    assert rig.frame_at(1) == frame(1000, seed=4)
    assert rig.stats.drops == {"rx_oversize": 2}


def test_buffer_size_from_srrctl_bounds_the_write(rig: RxRig, guest: Guest) -> None:
    rig.q.srrctl = d.SRRCTL_DESCTYPE_ADV_ONEBUF | 1  # 1 KiB buffers
    rig.give(7)
    before = guest.snapshot()
    rig.backend.inject(frame(1100))
    rig.backend.inject(frame(1024, seed=9))
    assert rig.q.poll() == 1
    assert rig.frame_at(0) == frame(1024, seed=9)
    allowed = [(rig.ring, rig.ring + 16), (rig.bufs[0], rig.bufs[0] + 1024)]
    assert_only_changed(guest, before, allowed)


def test_absurd_max_frame_capped_by_buffer(rig: RxRig, guest: Guest) -> None:
    rig.q.max_frame = 10**9
    rig.give(7)
    before = guest.snapshot()
    rig.backend.inject(frame(3000))
    assert rig.q.poll() == 0
    assert rig.stats.drops == {"rx_oversize": 1}
    assert_only_changed(guest, before, [(rig.bufs[0], rig.bufs[0] + BUF)])


def test_ring_full_holds_frames_until_tail_written(rig: RxRig) -> None:
    frames = [frame(100, seed=i) for i in range(5)]
    for f in frames:
        rig.backend.inject(f)
    assert rig.give(3) == 3
    assert not rig.q.has_room()
    assert rig.backend.pending == 2
    assert rig.q.poll() == 0 and rig.backend.pending == 2
    assert rig.give(4) == 2
    assert rig.q.has_room()
    assert [rig.frame_at(i) for i in range(5)] == frames
    assert rig.stats.drops == {}


def test_budget(rig: RxRig) -> None:
    rig.q.tail = 7
    for i in range(5):
        rig.backend.inject(frame(80, seed=i))
    assert rig.q.poll(budget=2) == 2
    assert rig.q.head == 2 and rig.backend.pending == 3


def test_filter(guest: Guest) -> None:
    rig = RxRig(guest)
    mine = bytes.fromhex("020000000002")
    rig.q.accepts = lambda dst: dst == mine or bool(dst[0] & 1)
    rig.q.tail = 7
    rig.backend.inject(frame(60, dst=bytes.fromhex("02000000dead")))
    rig.backend.inject(frame(61, dst=mine))
    assert rig.q.poll() == 1
    assert rig.wb(0).length == 61 and rig.stats.drops == {"rx_filtered": 1}


def test_vnet_header_gso_dropped_and_runts(guest: Guest) -> None:
    rig = RxRig(guest, vnet=True)
    rig.q.tail = 7
    rig.backend.inject(frame(1000), vnet_hdr=o.VnetHdr(0, o.GSO_TCPV4, 54, 1448).pack())
    rig.backend.inject(b"\x01" * 10)
    rig.backend.inject(frame(64), vnet_hdr=o.VnetHdr(o.VNET_F_DATA_VALID).pack())
    assert rig.q.poll() == 1
    assert rig.wb(0).length == 64
    assert rig.stats.drops == {"rx_gso": 1, "rx_runt": 1}


def test_eventfd_follows_queue() -> None:
    import select

    b = LoopBackend()
    fd = b.fileno()
    assert fd is not None
    p = select.poll()
    p.register(fd, select.POLLIN)
    assert p.poll(0) == []
    b.inject(b"a" * 60)
    b.inject(b"b" * 60)
    assert p.poll(0)
    buf = memoryview(bytearray(100))
    assert b.recv_into(bytearray(10), buf) == 60
    assert p.poll(0)
    assert b.recv_into(bytearray(10), buf) == 60 and bytes(buf[:60]) == b"b" * 60
    assert p.poll(0) == []
    assert b.recv_into(bytearray(10), buf) is None
    b.close()


def test_reset(rig: RxRig) -> None:
    rig.q.max_frame = 9000
    rig.give(3)
    rig.q.reset()
    assert (rig.q.head, rig.q.tail, rig.q.len, rig.q.rxdctl, rig.q.srrctl,
            rig.q.max_frame) == (0, 0, 0, 0, 0, 1522)


# -- guest garbage ----------------------------------------------------------------------------


def test_buffer_outside_memory_gets_error_writeback(rig: RxRig, guest: Guest) -> None:
    rig.arm(0, guest.end + 0x1000)          # unmapped
    rig.arm(1, guest.end - 100)             # runs past the end of guest memory
    rig.q.tail = 7
    before = guest.snapshot()
    for i in range(3):
        rig.backend.inject(frame(200, seed=i))
    assert rig.q.poll() == 3
    err = d.RXD_STAT_DD | d.RXD_STAT_EOP | d.RXD_ERR_RXE
    assert rig.wb(0).status_error == err and rig.wb(1).status_error == err
    assert rig.wb(0).length == 0
    assert rig.wb(2).status_error == OK and rig.frame_at(2) == frame(200, seed=2)
    assert rig.stats.drops == {"rx_bad_buffer": 2} and rig.stats.gprc == 1
    assert_only_changed(guest, before,
                        [(rig.ring, rig.ring + 48), (rig.bufs[2], rig.bufs[2] + BUF)])


def test_bad_buffer_without_frame_leaves_descriptor(rig: RxRig) -> None:
    rig.arm(0, 0xDEAD_0000_0000)
    rig.q.tail = 7
    assert rig.q.poll() == 0
    assert rig.q.head == 0 and rig.wb(0).status_error == 0


@pytest.mark.parametrize(("setup", "reason"), [
    (lambda q: setattr(q, "rxdctl", 0), "rx_disabled"),
    (lambda q: setattr(q, "bal", q.bal + 64), "rx_ring_invalid"),
    (lambda q: setattr(q, "len", 0), "rx_ring_invalid"),
    (lambda q: setattr(q, "len", 130), "rx_ring_invalid"),
    (lambda q: setattr(q, "len", 1 << 30), "rx_ring_invalid"),
    (lambda q: setattr(q, "tail", 9), "rx_ring_pointer"),
    (lambda q: setattr(q, "head", 100), "rx_ring_pointer"),
    (lambda q: setattr(q, "bah", 0x7FFF), "rx_ring_dma"),
    (lambda q: setattr(q, "srrctl", d.SRRCTL_DESCTYPE_HDR_SPLIT_ALWAYS | 2),
     "rx_unsupported_desctype"),
    (lambda q: setattr(q, "_memory", lambda: None), "rx_no_memory"),
])
def test_unusable_ring_drops_instead_of_spinning(rig: RxRig, guest: Guest, setup: object,
                                                 reason: str) -> None:
    rig.q.tail = 7
    setup(rig.q)  # type: ignore[operator]
    before = guest.snapshot()
    for i in range(3):
        rig.backend.inject(frame(100, seed=i))
    assert rig.q.has_room()  # the owner keeps reading, so frames do not pile up
    assert rig.q.poll() == 0
    assert rig.backend.pending == 0
    assert rig.stats.drops == {reason: 3} and rig.stats.gprc == 0
    assert guest.snapshot() == before


def test_fuzzed_descriptors_and_registers(guest: Guest) -> None:
    """Random buffer addresses, pointers, SRRCTL and max_frame: no exception, no write
    outside the ring and the buffers the descriptors name, RDH stays sane."""
    rng = random.Random(1234)
    rig = RxRig(guest, count=16)
    for _ in range(300):
        q = rig.q
        q.head, q.tail = rng.randrange(18), rng.randrange(18)
        head = q.head
        q.srrctl = rng.choice([0x82000002, 0x02000000, 0x0A000002, rng.getrandbits(32)])
        q.max_frame = rng.choice([1522, 0, 60, 9000, rng.getrandbits(20)])
        # the buffer size the guest configured: the device may fill that much
        size = min((q.srrctl & 0x7F) * 1024 or 2048, q.max_frame, 16384)
        allowed = [(rig.ring, rig.ring + 16 * 16)]
        for i in range(16):
            choice = rng.random()
            addr = (rig.bufs[i] if choice < 0.5 else rng.getrandbits(64) if choice < 0.8
                    else guest.end - rng.randrange(1, 3000))
            rig.arm(i, addr)
            allowed.append((addr, addr + size))
        for _ in range(rng.randrange(5)):
            rig.backend.inject(payload_bytes(rng.randrange(0, 4000)))
        before = guest.snapshot()
        q.poll(rng.randrange(1, 70))
        assert q.head == head if head >= 16 or q.tail >= 16 else 0 <= q.head < 16
        assert_only_changed(guest, before, allowed)
    assert "rx_internal_error" not in rig.stats.drops
    assert rig.stats.gprc > 0 and len(rig.stats.drops) >= 4
