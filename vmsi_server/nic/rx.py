"""RX queue 0: move frames from the backend into the guest's receive buffers.

Procedure (reference/igbvf.md §7.1): descriptors ``[RDH, RDT)`` belong to the device.
For each frame take the descriptor at RDH, read it straight into the buffer at
``pkt_addr`` (for a tap: one ``os.readv([vnet_hdr, guest_buffer_view, scratch])``),
write back ``status_error = DD | EOP`` and the length, advance RDH (wrapping). The
caller raises the RX cause when :meth:`RxQueue.poll` returns more than 0.

Receive checksum offload (the PF's RXCSUM, which igb enables): each frame's IPv4
header and TCP/UDP checksums are checked as the hardware does (``checksum``, the
compiled ``vl_rx_checksum``) and reported as IPCS/TCPCS/UDPCS, or IPE/TCPE, so
igbvf need not sum every payload in the guest. Without the compiled lane no bits
are reported and the guest checks in software.

Only the advanced one-buffer descriptor type (SRRCTL DESCTYPE 001, what igbvf uses
at MTU 1500/1504 and <= 1024) is implemented; with another type frames are dropped
(``rx_unsupported_desctype``). The buffer length used is SRRCTL.BSIZEPKT (KiB, 0 =
2 KiB) capped by ``max_frame`` (SET_LPE, default 1522, which is also what igbvf maps).

Drops (``stats.drop(reason)``; the frame is consumed, the descriptor is not):
``rx_oversize`` (longer than the buffer / max_frame; tun truncates, the backend
reports it), ``rx_gso`` (a vnet header with gso_type != NONE: cannot happen with
TUNSETOFFLOAD 0), ``rx_runt`` (< 14 bytes), ``rx_filtered`` (``accepts(dst_mac)``
said no). A descriptor whose buffer is outside guest memory gets the frame's error
write-back (DD | EOP | RXE, length 0) so the driver recycles it (``rx_bad_buffer``).

Ring full (RDH == RDT) leaves frames in the backend: :meth:`has_room` turns false and
the owner stops watching the backend fd until :meth:`tail_written`. A ring that cannot
take frames at all (RXDCTL.ENABLE clear, invalid ring registers, RDH/RDT beyond the
ring, ring outside guest memory, no guest memory, unsupported descriptor type)
drops them as hardware would, so the fd never spins: ``rx_disabled``,
``rx_ring_invalid``, ``rx_ring_pointer``, ``rx_ring_dma``, ``rx_no_memory``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import structlog

from vmsi_server.dma.errors import DmaError
from vmsi_server.dma.memory import GuestMemory
from vmsi_server.fastlane import RxChecksum
from vmsi_server.fastlane.rxpath import DROP_REASONS, STOP_RING_DMA, RxResult, TapRx
from vmsi_server.nic.backend.base import PacketBackend
from vmsi_server.nic.descriptors import (
    DESC_SIZE,
    RX_WB_DESC,
    RXD_ERR_IPE,
    RXD_ERR_RXE,
    RXD_ERR_TCPE,
    RXD_STAT_DD,
    RXD_STAT_EOP,
    RXDCTL_ENABLE,
    SRRCTL_BSIZEPKT_MASK,
    SRRCTL_DESCTYPE_ADV_ONEBUF,
    SRRCTL_DESCTYPE_MASK,
    RingPointers,
    ring_slots,
)
from vmsi_server.nic.offload import ETH_ALEN, ETH_HLEN, GSO_NONE, VNET_HDR_LEN
from vmsi_server.nic.tx import DmaMemory, QueueStats

log = structlog.get_logger("vmsi.nic.rx")

DEFAULT_MAX_FRAME = 1522
"""igbvf's SET_LPE at MTU 1500, and the size of the buffers it maps."""
MAX_RX_BUFFER = 16 * 1024
"""Upper bound of a one-buffer receive buffer (BSIZEPKT is at most 127 KiB; the
hardware's limit is 16 KiB), whatever max_frame the guest asks for."""
DEFAULT_BUDGET = 64

_STATUS_OK = RXD_STAT_DD | RXD_STAT_EOP
_STATUS_ERR = RXD_STAT_DD | RXD_STAT_EOP | RXD_ERR_RXE
_CSUM_ERRORS = RXD_ERR_IPE | RXD_ERR_TCPE
_ADDR = struct.Struct("<Q")


class RxQueue(RingPointers):
    """The VF's RX queue 0; the register engine stores the ring registers here."""

    def __init__(self, memory: Callable[[], DmaMemory | None], backend: PacketBackend,
                 stats: QueueStats, accepts: Callable[[bytes], bool] | None = None,
                 checksum: RxChecksum | None = None, fast: TapRx | None = None) -> None:
        super().__init__()
        self._memory = memory
        self.checksum = checksum
        self.fast = fast
        """The compiled loop over the tap (``fastlane.rxpath``), used when set."""
        self.backend = backend
        self.stats = stats
        self.accepts = accepts
        self.bal = 0
        self.bah = 0
        self.len = 0
        self.srrctl = 0
        self.rxdctl = 0
        self.max_frame = DEFAULT_MAX_FRAME
        self.unicast: bytes | None = None
        """The VF's own MAC while the PF forwards to it (CTS): frames to it skip the
        ``accepts`` call. None: every frame asks ``accepts``."""
        self._vhdr = bytearray(VNET_HDR_LEN)
        self._scratch = memoryview(bytearray(MAX_RX_BUFFER))

    def buffer_length(self) -> int:
        """Bytes a frame may use of each buffer: BSIZEPKT capped by SET_LPE's limit."""
        return min((self.srrctl & SRRCTL_BSIZEPKT_MASK) * 1024 or 2048,
                   max(self.max_frame, 0), MAX_RX_BUFFER)

    def fast_ring(self) -> tuple[int, int, int] | None:
        """(base, descriptors, buffer length) when compiled code may fill the ring on
        its own: enabled, valid, of the one descriptor type implemented."""
        if (self.fast is None or not self.rxdctl & RXDCTL_ENABLE
                or self.srrctl & SRRCTL_DESCTYPE_MASK != SRRCTL_DESCTYPE_ADV_ONEBUF):
            return None
        base, n = ring_slots(self.bal, self.bah, self.len)
        return (base, n, self.buffer_length()) if n else None

    def drain(self, budget: int, reason: str) -> int:
        """Drop up to ``budget`` frames because the ring cannot take them."""
        return self._drain(budget, reason)

    def reset(self) -> None:
        self.bal = self.bah = self.len = 0
        self.head = self.tail = 0
        self.srrctl = self.rxdctl = 0
        self.max_frame = DEFAULT_MAX_FRAME
        self.unicast = None

    def has_room(self) -> bool:
        """False when the ring is usable but has no free descriptor (RDH == RDT): the
        owner should stop watching the backend until :meth:`tail_written`. True
        otherwise, including when :meth:`poll` would drop frames because the ring
        cannot take any."""
        if not self.rxdctl & RXDCTL_ENABLE:
            return True
        _, n = ring_slots(self.bal, self.bah, self.len)
        return not n or self.head != self.tail or self.head >= n

    def tail_written(self) -> int:
        """RDT was written: deliver what the backend holds, as far as descriptors allow."""
        n = self.len // DESC_SIZE
        return self.poll(n if 0 < n <= (1 << 16) else DEFAULT_BUDGET)

    def poll(self, budget: int = DEFAULT_BUDGET) -> int:
        """Take up to ``budget`` frames from the backend; return the descriptors written
        back (frames delivered, plus error write-backs for unusable buffers)."""
        try:
            return self._poll(budget)
        except Exception:  # a bug here must not take the server down with the guest
            log.exception("rx.internal_error")
            self.stats.drop("rx_internal_error")
            return 0

    def _drain(self, budget: int, reason: str) -> int:
        """Drop up to ``budget`` frames because the ring cannot take them."""
        recv = self.backend.recv_into
        for _ in range(budget):
            if recv(self._vhdr, self._scratch) is None:
                break
            self.stats.drop(reason)
        return 0

    def _fast_done(self, r: RxResult) -> int:
        """Book what the compiled loop did exactly as the Python loop books it."""
        self.head = r.head
        stats = self.stats
        if r.frames:
            stats.rx_packets(r.frames, r.octets, r.multicast)
        if r.csum_good or r.csum_errors:
            stats.rx_checksums(r.csum_good, r.csum_errors)
        for reason, count in zip(DROP_REASONS, r.drops, strict=True):
            if count:
                stats.drop(reason, count)
        errors = getattr(self.backend, "errors", None)
        if errors is not None:
            if r.read_errno:
                errors[f"rx_errno_{r.read_errno}"] += 1
            if r.short_reads:
                errors["rx_short"] += r.short_reads
        if r.stop == STOP_RING_DMA:
            return r.written + self._drain(r.left, "rx_ring_dma")
        return r.written

    def _poll(self, budget: int) -> int:
        if not self.rxdctl & RXDCTL_ENABLE:
            return self._drain(budget, "rx_disabled")
        base, n = ring_slots(self.bal, self.bah, self.len)
        if not n:
            return self._drain(budget, "rx_ring_invalid")
        head, tail = self.head, self.tail
        if head >= n or tail >= n:
            return self._drain(budget, "rx_ring_pointer")
        if self.srrctl & SRRCTL_DESCTYPE_MASK != SRRCTL_DESCTYPE_ADV_ONEBUF:
            return self._drain(budget, "rx_unsupported_desctype")
        mem = self._memory()
        if mem is None:
            return self._drain(budget, "rx_no_memory")
        buflen = self.buffer_length()
        fast = self.fast
        if fast is not None and isinstance(mem, GuestMemory):
            result = fast.poll(mem, base, n, head, tail, buflen, budget, self.unicast)
            if result is not None:
                return self._fast_done(result)
        backend, stats, accepts = self.backend, self.stats, self.accepts
        recv, vhdr = backend.recv_into, self._vhdr
        check_gso = backend.vnet_hdr
        unicast = self.unicast
        checksum = self.checksum
        csum_good = csum_errors = 0
        pack_wb, addr_of, view = RX_WB_DESC.pack_into, _ADDR.unpack_from, mem.view
        written = 0
        left = budget
        frames = octets = multicast = 0  # good frames, counted once at the end
        try:
            while left > 0 and head != tail:
                k = min(left, (tail - head) % n, n - head)
                try:
                    ring = view(base + head * DESC_SIZE, k * DESC_SIZE, True)
                except DmaError:
                    self.head = head
                    return written + self._drain(left, "rx_ring_dma")
                j = 0
                stop = False
                while j < k and left > 0:
                    left -= 1
                    off = j * DESC_SIZE
                    try:
                        buf = view(addr_of(ring, off)[0], buflen, True)
                    except DmaError:
                        if recv(vhdr, self._scratch) is None:
                            stop = True
                            break
                        stats.drop("rx_bad_buffer")
                        pack_wb(ring, off, 0, 0, 0, _STATUS_ERR, 0, 0)
                        j += 1
                        written += 1
                        continue
                    got = recv(vhdr, buf)
                    if got is None:
                        stop = True
                        break
                    # The common case first: a frame that fits, for the VF's own MAC.
                    if (ETH_HLEN <= got <= buflen and not (check_gso and vhdr[1])
                            and (buf[:ETH_ALEN] == unicast if unicast is not None else False)):
                        pass
                    elif check_gso and vhdr[1] != GSO_NONE:
                        stats.drop("rx_gso")
                        continue
                    elif got > buflen:
                        stats.drop("rx_oversize")
                        continue
                    elif got < ETH_HLEN:
                        stats.drop("rx_runt")
                        continue
                    elif accepts is not None and not accepts(bytes(buf[:ETH_ALEN])):
                        stats.drop("rx_filtered")
                        continue
                    elif buf[0] & 1:
                        multicast += 1
                    status = _STATUS_OK
                    if checksum is not None:
                        bits = checksum(buf, got, vhdr[0] if check_gso else 0)
                        if bits & _CSUM_ERRORS:
                            csum_errors += 1
                        elif bits:
                            csum_good += 1
                        status |= bits
                    pack_wb(ring, off, 0, 0, 0, status, got, 0)
                    frames += 1
                    octets += got
                    j += 1
                    written += 1
                head = (head + j) % n
                self.head = head
                if stop:
                    break
        finally:
            if frames:
                stats.rx_packets(frames, octets, multicast)
            if csum_good or csum_errors:
                stats.rx_checksums(csum_good, csum_errors)
        return written
