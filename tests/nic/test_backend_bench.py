"""Per-packet cost of the data path to the loop backend (timeit), with loose bounds.

Run ``PYTHONPATH=. python tests/nic/test_backend_bench.py`` for the table; under pytest the same
measurements run briefly and only catch gross regressions (e.g. a quadratic loop).

* TX "vnet": what the tap path costs without the writev syscall (descriptor walk,
  views of guest memory, header rewrite for TSO, vnet header).
* TX "software": the loop backend without vnet headers (software segmentation and
  checksums; the frames are joined/copied).
* RX: one frame per poll iteration, 64 per poll() call, including the loop backend's
  own copy into the guest buffer.
"""

from __future__ import annotations

import math
import timeit
from collections.abc import Callable

from test_descriptors_helpers import (
    Guest,
    enable_rx,
    enable_tx,
    ipv4_fixed,
    ipv4_tcp,
    ipv4_udp,
    payload_bytes,
)

from vmsi_server.nic import descriptors as d
from vmsi_server.nic.backend.loop import LoopBackend
from vmsi_server.nic.descriptors import RxReadDesc, TxContextDesc, TxDataDesc
from vmsi_server.nic.rx import RxQueue
from vmsi_server.nic.stats import VfStats
from vmsi_server.nic.tx import TxQueue

RING = 1024


def tx_setup(guest: Guest, tso: bool, vnet: bool) -> tuple[Callable[[], None], TxQueue]:
    """A ring full of identical packets; each call writes TDT one packet further."""
    q = TxQueue(lambda: guest.memory, LoopBackend(vnet_hdr=vnet, keep=False), VfStats())
    ring = guest.alloc(RING * 16)
    enable_tx(q, ring, RING)
    if tso:
        frame = ipv4_tcp(payload_bytes(65536 - 54 - 14 - 2), tso=True)
        buf = guest.alloc(len(frame))
        guest.write(buf, frame)
        descs = [TxContextDesc.build(14, 20, d.TUCMD_IPV4 | d.TUCMD_L4T_TCP, 20, 1448).pack(),
                 TxDataDesc.build(buf, 54 + 200, eop=False, rs=False, tse=True,
                                  popts=d.TXD_POPTS_TXSM | d.TXD_POPTS_IXSM).pack()]
        for off in range(254, len(frame), 4096):  # page-sized fragments
            n = min(4096, len(frame) - off)
            descs.append(TxDataDesc.build(buf + off, n, eop=off + n == len(frame),
                                          rs=off + n == len(frame), tse=True).pack())
    else:
        frame = ipv4_fixed(ipv4_udp(payload_bytes(1514 - 42)))
        assert len(frame) == 1514
        buf = guest.alloc(len(frame))
        guest.write(buf, frame)
        descs = [TxDataDesc.build(buf, len(frame)).pack()]
    per = len(descs)
    slots = RING - RING % math.lcm(per, 8)  # whole packets, and a multiple of 128 bytes
    for i in range(slots):
        guest.write(ring + i * 16, descs[i % per])
    q.len = slots * 16

    def one() -> None:
        q.tail = (q.tail + per) % slots
        q.doorbell()

    return one, q


def rx_setup(guest: Guest) -> tuple[Callable[[], None], RxQueue]:
    backend = LoopBackend()
    q = RxQueue(lambda: guest.memory, backend, VfStats())
    ring = guest.alloc(RING * 16)
    enable_rx(q, ring, RING)
    image = b"".join(RxReadDesc(guest.alloc(2048)).pack() for _ in range(RING))
    guest.write(ring, image)
    q.tail = RING - 1
    frame = ipv4_fixed(ipv4_udp(payload_bytes(1514 - 42)))

    def batch() -> None:
        for _ in range(64):
            backend.inject(frame)
        q.poll(64)
        guest.write(ring, image)  # the driver re-arms every descriptor (one memcpy)
        q.tail = (q.head - 1) % RING

    return batch, q


def measure(number: int = 2000) -> dict[str, float]:
    """Microseconds per packet (TX) or frame (RX)."""
    out: dict[str, float] = {}
    for name, tso, vnet in (("tx 1514 B, vnet", False, True),
                            ("tx 1514 B, software", False, False),
                            ("tx 64 KiB TSO, vnet", True, True),
                            ("tx 64 KiB TSO, software", True, False)):
        guest = Guest(size=8 << 20)
        try:
            fn, q = tx_setup(guest, tso, vnet)
            n = max(10, number // (40 if tso and not vnet else 1))
            fn()
            t = min(timeit.repeat(fn, number=n, repeat=3)) / n
            assert q.stats.drops == {}, q.stats.drops  # type: ignore[attr-defined]
            out[name] = t * 1e6
        finally:
            guest.close()
    guest = Guest(size=8 << 20)
    try:
        fn, rq = rx_setup(guest)
        n = max(5, number // 64)
        t = min(timeit.repeat(fn, number=n, repeat=3)) / (n * 64)
        assert rq.stats.drops == {}  # type: ignore[attr-defined]
        out["rx 1514 B frame"] = t * 1e6
    finally:
        guest.close()
    return out


BOUNDS_US = {
    "tx 1514 B, vnet": 1000.0,
    "tx 1514 B, software": 1000.0,
    "tx 64 KiB TSO, vnet": 3000.0,
    "tx 64 KiB TSO, software": 50000.0,
    "rx 1514 B frame": 1000.0,
}


def test_per_packet_cost_is_sane() -> None:
    got = measure(number=200)
    for name, us in got.items():
        print(f"{name:28s} {us:9.1f} us")
        assert us < BOUNDS_US[name], (name, us)


if __name__ == "__main__":
    for name, us in measure().items():
        print(f"{name:28s} {us:9.1f} us")
