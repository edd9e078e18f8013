"""TX queue 0: walk the descriptor ring on a TDT doorbell and send frames.

Procedure (reference/igbvf.md §7.2): walk ``[TDH, TDT)``; store context descriptors;
gather data descriptors up to EOP; apply the offloads (§8) and hand the frame to the
backend; write DD into each descriptor that had RS; advance TDH (wrapping).

Hot path and copies: the data buffers are memoryviews of guest memory
(``GuestMemory.views_for``) passed straight to the backend, which for a tap is one
``os.writev([vnet_hdr, *views])``. Only when a header must change (TSO lengths and
checksums, an IPv4 header checksum, VLAN insertion, SCTP CRC) are the header bytes
copied into a small bytearray: ``[vnet_hdr, header_copy, *payload_views]``.

A tap takes GSO super-frames: a TSO packet goes out as one frame with a
``virtio_net_hdr`` (TCPV4/TCPV6, gso_size = MSS), after the IPv4 total length and
header checksum (or the IPv6 payload length) are rewritten and the L4 length is added
back into the TCP checksum field: igbvf leaves Intel's length-free pseudo-header sum
there, Linux GSO expects the length-inclusive one (§8.3/§8.4). For a backend without
vnet headers the same header + frame go through :func:`offload.apply_vnet_hdr`, i.e.
segmentation and checksums in software.

Guest garbage never raises out of :meth:`TxQueue.doorbell` and never touches memory
outside ``GuestMemory``. One call looks at no more than ``DOORBELL_BUDGET``
descriptors; when more are pending it sets ``more`` and the owner calls again from the
event loop (``VfCore`` does), so a giant ring costs many short steps, not one long one.
Decisions, with the drop reason counted through ``stats.drop``:

* invalid ring registers (base not 128-byte aligned, length 0 / not a multiple of 128
  / > 1 MiB) or TDH/TDT beyond the ring: nothing is done (``tx_ring_invalid``,
  ``tx_ring_pointer``); the ring outside guest memory: ``tx_ring_dma``.
* a packet with a bad descriptor (zero length, invalid DTYP), a buffer outside guest
  memory, more than ``MAX_FRAME`` bytes (``MAX_TSO_FRAME`` with TSE), bad offload
  parameters: the packet is dropped, its descriptors are completed (DD where RS) and
  TDH moves past it, as hardware would, so the driver can reclaim them.
* a chain without EOP that reaches TDT: if it is shorter than ``MAX_CHAIN`` and the
  ring is not full the driver is still writing it: TDH stays at its first descriptor
  and the next doorbell resumes there. At ``MAX_CHAIN`` descriptors (or with the ring
  full) the chain is dropped (``tx_chain_too_long``) and the rest up to the next EOP
  is discarded as well, across doorbells.
* PAYLEN in the data descriptor is not used; lengths come from the gathered buffers.
* IPv4 header checksums (IXSM, and always for TSO over IPv4) are computed from scratch
  over the IHL bytes, ignoring the seed igbvf leaves in the field (zero for non-tunnel
  packets). Tunnelled TSO (GSO_PARTIAL, IPLEN larger than the IPv4 header) and TSO of
  anything but TCP are dropped (``tx_tso_invalid``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import structlog

from vmsi_server.dma.errors import DmaError
from vmsi_server.dma.memory import GuestMemory
from vmsi_server.fastlane.txpath import TapTx, TxResult
from vmsi_server.nic.backend.base import BytesLike, PacketBackend
from vmsi_server.nic.descriptors import (
    CTX_IPLEN_MASK,
    CTX_L4LEN_MASK,
    CTX_L4LEN_SHIFT,
    CTX_MACLEN_MASK,
    CTX_MACLEN_SHIFT,
    CTX_MSS_SHIFT,
    CTX_VLAN_SHIFT,
    DESC_SIZE,
    LEGACY_STATUS_OFFSET,
    TUCMD_IPV4,
    TUCMD_L4T_MASK,
    TUCMD_L4T_SCTP,
    TUCMD_L4T_TCP,
    TUCMD_L4T_UDP,
    TX_DESC,
    TXD_CMD_DEXT,
    TXD_CMD_EOP,
    TXD_CMD_IC,
    TXD_CMD_RS,
    TXD_CMD_TSE,
    TXD_CMD_VLE,
    TXD_DTALEN_MASK,
    TXD_DTYP_CTXT,
    TXD_DTYP_DATA,
    TXD_DTYP_MASK,
    TXD_POPTS_IXSM,
    TXD_POPTS_TXSM,
    TXDCTL_ENABLE,
    RingPointers,
    ring_slots,
)
from vmsi_server.nic.offload import (
    ETH_HLEN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    IPPROTO_TCP,
    IPV6_HLEN,
    SCTP_CSUM_OFFSET,
    TCP_CSUM_OFFSET,
    TCP_CWR,
    UDP_CSUM_OFFSET,
    VNET_F_NEEDS_CSUM,
    VNET_HDR,
    ZERO_VNET_HDR,
    OffloadError,
    VnetHdr,
    apply_vnet_hdr,
    crc32c,
    insert_vlan,
    ipv4_header_csum,
    ones_add,
    split_prefix,
)

log = structlog.get_logger("vmsi.nic.tx")

MAX_CHAIN = 64
"""Data descriptors one packet may use (igbvf needs at most MAX_SKB_FRAGS + 1)."""
MAX_FRAME = 9728
"""Largest non-TSO frame (the 82576's 9.5 KiB jumbo limit; igbvf's max MTU is 9216)."""
MAX_TSO_FRAME = 65535 + ETH_HLEN + 4
"""Largest TSO super-frame: the IP length fields are 16 bits."""
DOORBELL_BUDGET = 1024
"""Descriptors one doorbell call walks before yielding to the event loop (igbvf
writes TDT once per packet, so in practice a call sees one or two packets; the
limit matters for a ring of 65528 descriptors written in one go)."""
MIN_MSS = 64
"""Smaller MSS values are refused: they would turn one doorbell into ~1000 segments."""
MAX_MSS = MAX_FRAME
_DD_ADV = struct.pack("<I", 1)
_DD_LEGACY = b"\x01"


class QueueStats(Protocol):
    def tx_packet(self, length: int) -> None: ...
    def tx_packets(self, count: int, octets: int) -> None: ...
    def tx_offloaded(self, tso_segments: int) -> None: ...
    def tx_offloads(self, tso_frames: int, tso_segments: int, csum_frames: int) -> None: ...
    def rx_packet(self, length: int, multicast: bool) -> None: ...
    def rx_packets(self, count: int, octets: int, multicast: int) -> None: ...
    def rx_checksums(self, good: int, errors: int) -> None: ...
    def drop(self, reason: str, count: int = 1) -> None: ...


class DmaMemory(Protocol):
    """The part of ``vmsi_server.dma.GuestMemory`` the queues use."""

    def read(self, iova: int, length: int) -> bytes: ...
    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None: ...
    def view(self, iova: int, length: int, writable: bool = False) -> memoryview: ...
    def views_for(self, segments: Sequence[tuple[int, int]],
                  writable: bool = False) -> list[memoryview]: ...


class _Drop(Exception):
    """Internal: the current packet is dropped for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TxContext(NamedTuple):
    """The decoded context descriptor (one slot; IDX is ignored)."""

    maclen: int
    iplen: int
    vlan: int
    tucmd: int
    l4len: int
    mss: int


class TxQueue(RingPointers):
    """The VF's TX queue 0; the register engine stores the ring registers here."""

    def __init__(self, memory: Callable[[], DmaMemory | None], backend: PacketBackend,
                 stats: QueueStats, fast: TapTx | None = None) -> None:
        super().__init__()
        self._memory = memory
        self.fast = fast
        """The compiled walk over the tap (``fastlane.txpath``), tried first when set."""
        self.backend = backend
        self.stats = stats
        self.bal = 0
        self.bah = 0
        self.len = 0
        self.txdctl = 0
        self.dca_txctrl = 0
        self._ctx: TxContext | None = None
        self._ctx_raw = b""
        self._discard = False
        self.budget = DOORBELL_BUDGET
        """Descriptors one ``doorbell()`` call looks at, at most."""
        self.more = False
        """The last ``doorbell()`` stopped at ``budget`` with descriptors left: call
        it again (from the event loop, not recursively) to continue."""

    def reset(self) -> None:
        self.bal = self.bah = self.len = 0
        self.head = self.tail = 0
        self.txdctl = self.dca_txctrl = 0
        self._ctx = None
        self._ctx_raw = b""
        if self.fast is not None:
            self.fast.set_context(None)
        self._discard = False
        self.more = False

    def fast_ring(self) -> tuple[int, int] | None:
        """(base, descriptors) when compiled code may serve TDT writes on its own: the
        queue is enabled with a valid ring and in no state only the Python walk
        handles (discarding up to an EOP, a bounded walk to continue)."""
        if (self.fast is None or not self.txdctl & TXDCTL_ENABLE or self._discard
                or self.more):
            return None
        base, n = ring_slots(self.bal, self.bah, self.len)
        return (base, n) if n else None

    # -- the doorbell ------------------------------------------------------------------

    def doorbell(self) -> int:
        """TDT was written: process ``[head, tail)``; return RS descriptors completed."""
        if not self.txdctl & TXDCTL_ENABLE:
            self.more = False
            return 0
        try:
            return self._walk()
        except Exception:  # a bug here must not take the server down with the guest
            log.exception("tx.internal_error")
            self.stats.drop("tx_internal_error")
            self.more = False
            return 0

    def _walk(self) -> int:
        self.more = False
        base, n = ring_slots(self.bal, self.bah, self.len)
        stats = self.stats
        if not n:
            stats.drop("tx_ring_invalid")
            return 0
        head, tail = self.head, self.tail
        if head >= n or tail >= n:
            stats.drop("tx_ring_pointer")
            return 0
        pending = (tail - head) % n
        if not pending:
            return 0
        # Bounded work per call: a window of at most ``budget`` descriptors. The rest
        # waits for the owner's continuation (``more``), so one doorbell on a huge
        # ring cannot hold up the event loop (and the vCPU waiting on a read).
        window = pending if pending <= self.budget else max(self.budget, MAX_CHAIN + 1)
        self.more = window < pending
        mem = self._memory()
        if mem is None:
            stats.drop("tx_no_memory")
            return 0
        fast = self.fast
        if fast is not None:
            shared = fast.context()  # the compiled doorbell may have stored a newer one
            if shared is not None and shared != self._ctx_raw:
                self._store_context(shared, 0)
        if (fast is not None and not self._discard and not self.more
                and isinstance(mem, GuestMemory)):
            done = fast.walk(mem, base, n, head, tail,
                             self._ctx_raw if self._ctx is not None else None)
            if done is not None and done.consumed:
                self._fast_done(done)
                if done.consumed == pending:
                    return done.completed
                return done.completed + self._walk()  # Python takes it from here
        first = min(window, n - head)
        try:
            raw = mem.read(base + head * DESC_SIZE, first * DESC_SIZE)
            if first < window:
                raw += mem.read(base, (window - first) * DESC_SIZE)
        except DmaError:
            self.more = False
            stats.drop("tx_ring_dma")
            return 0

        unpack = TX_DESC.unpack_from
        completed = 0
        consumed = 0  # descriptors of finished packets / contexts: how far TDH moves
        segs: list[tuple[int, int]] = []
        rs: list[tuple[int, bytes]] = []  # (status address, DD value) of RS descriptors
        first_cmd = first_olinfo = 0
        bad: str | None = None
        for i in range(window):
            addr, cmd, olinfo = unpack(raw, i * DESC_SIZE)
            if cmd & TXD_CMD_DEXT:
                dtyp = cmd & TXD_DTYP_MASK
                if dtyp == TXD_DTYP_CTXT:
                    if segs or self._discard:
                        # A context in the middle of a packet: drop what came before.
                        if segs:
                            stats.drop("tx_bad_chain")
                        completed += self._complete(mem, rs)
                        segs, rs, bad, self._discard = [], [], None, False
                    self._store_context(raw, i * DESC_SIZE)
                    consumed = i + 1
                    continue
                if dtyp != TXD_DTYP_DATA and bad is None:
                    bad = "tx_bad_desc_type"
            if cmd & TXD_CMD_RS:
                rs.append((base + (head + i) % n * DESC_SIZE + LEGACY_STATUS_OFFSET,
                           _DD_ADV if cmd & TXD_CMD_DEXT else _DD_LEGACY))
            if self._discard:
                if cmd & TXD_CMD_EOP:
                    self._discard = False
                    completed += self._complete(mem, rs)
                    rs, consumed = [], i + 1
                continue
            if not segs:
                first_cmd, first_olinfo = cmd, olinfo
            length = cmd & TXD_DTALEN_MASK
            if not length and bad is None:
                bad = "tx_zero_length"
            segs.append((addr, length))
            if cmd & TXD_CMD_EOP:
                self._packet(mem, segs, first_cmd, first_olinfo, raw, i, bad)
                completed += self._complete(mem, rs)
                segs, rs, bad, consumed = [], [], None, i + 1
            elif len(segs) >= MAX_CHAIN:
                stats.drop("tx_chain_too_long")
                completed += self._complete(mem, rs)
                segs, rs, bad, consumed = [], [], None, i + 1
                self._discard = True
        if segs and window == pending == n - 1:
            # The ring is full and the packet still has no EOP: the driver cannot add
            # the rest, so waiting would hang the queue.
            stats.drop("tx_chain_too_long")
            completed += self._complete(mem, rs)
            consumed = pending
            self._discard = True
        elif self._discard and not segs:
            # Discarding up to an EOP that has not been written yet: these are gone.
            completed += self._complete(mem, rs)
            consumed = window
        self.head = (head + consumed) % n
        return completed

    def _fast_done(self, r: TxResult) -> None:
        """Book what the compiled walk sent exactly as ``_packet`` books it."""
        _, n = ring_slots(self.bal, self.bah, self.len)
        self.head = (self.head + r.consumed) % n
        if r.context is not None:
            self._store_context(r.context, 0)
        stats = self.stats
        if r.frames:
            stats.tx_packets(r.frames, r.octets)
        if r.tso_frames or r.csum_frames:
            stats.tx_offloads(r.tso_frames, r.tso_segments, r.csum_frames)
        errors = getattr(self.backend, "errors", None)
        if errors is not None:
            if r.send_eagain:
                errors["tx_eagain"] += r.send_eagain
            if r.send_enobufs:
                errors["tx_enobufs"] += r.send_enobufs
            if r.send_errno:
                errors[f"tx_errno_{r.send_errno}"] += 1

    def _store_context(self, raw: bytes, off: int) -> None:
        key = raw[off:off + DESC_SIZE]
        if key == self._ctx_raw:
            return  # igbvf repeats the same context before every TSO/checksum packet
        self._ctx_raw = key
        if self.fast is not None:
            self.fast.set_context(key)
        vml, _, tucmd, mli = struct.unpack_from("<IIII", raw, off)
        self._ctx = TxContext(
            maclen=(vml >> CTX_MACLEN_SHIFT) & CTX_MACLEN_MASK,
            iplen=vml & CTX_IPLEN_MASK,
            vlan=vml >> CTX_VLAN_SHIFT,
            tucmd=tucmd & (TUCMD_IPV4 | TUCMD_L4T_MASK),
            l4len=(mli >> CTX_L4LEN_SHIFT) & CTX_L4LEN_MASK,
            mss=mli >> CTX_MSS_SHIFT,
        )

    def _complete(self, mem: DmaMemory, rs: list[tuple[int, bytes]]) -> int:
        """Write DD into the descriptors that had RS: the status dword of an advanced
        descriptor (its write-back format), the status byte of a legacy one."""
        done = 0
        for addr, dd in rs:
            try:
                mem.write(addr, dd)
            except DmaError:
                self.stats.drop("tx_writeback_dma")
                continue
            done += 1
        return done

    # -- one packet --------------------------------------------------------------------

    def _packet(self, mem: DmaMemory, segs: list[tuple[int, int]], cmd: int, olinfo: int,
                raw: bytes, last: int, bad: str | None) -> None:
        stats = self.stats
        if bad is not None:
            stats.drop(bad)
            return
        total = 0
        for _, length in segs:
            total += length
        if total > (MAX_TSO_FRAME if cmd & TXD_CMD_TSE and cmd & TXD_CMD_DEXT else MAX_FRAME):
            stats.drop("tx_oversize")
            return
        try:
            views = mem.views_for(segs, False)
        except DmaError:
            stats.drop("tx_dma")
            return
        try:
            if cmd & TXD_CMD_DEXT:
                hdr, parts, (frames, octets) = self._offload_adv(views, total, cmd, olinfo)
            else:
                hdr, parts, (frames, octets) = self._offload_legacy(views, total, cmd, raw,
                                                                    last)
        except _Drop as e:
            stats.drop(e.reason)
            return
        backend = self.backend
        if backend.vnet_hdr or hdr is ZERO_VNET_HDR:
            backend.send(hdr if backend.vnet_hdr else b"", parts)
            # One update for all the wire frames a TSO super-frame becomes.
            stats.tx_packets(frames, octets)
            if hdr is not ZERO_VNET_HDR:
                stats.tx_offloaded(frames if hdr[1] else 0)  # hdr[1]: gso_type
            return
        try:
            segments = apply_vnet_hdr(VnetHdr.unpack(hdr), b"".join(parts))
        except OffloadError:
            stats.drop("tx_offload")
            return
        stats.tx_offloaded(len(segments) if hdr[1] else 0)
        for frame in segments:
            backend.send(b"", (frame,))
            stats.tx_packet(len(frame))

    def _offload_legacy(self, views: list[memoryview], total: int, cmd: int, raw: bytes,
                        last: int) -> _Out:
        """Legacy descriptors: IC (checksum from CSS to the end, stored at CSO) and VLE,
        taken from the EOP descriptor."""
        off = last * DESC_SIZE
        cso, css = raw[off + 10], raw[off + 13]
        vlan = struct.unpack_from("<H", raw, off + 14)[0] if cmd & TXD_CMD_VLE else None
        vnet = _NO_OFFLOAD
        if cmd & TXD_CMD_IC:
            if cso < css or cso + 2 > total:
                raise _Drop("tx_csum_invalid")
            vnet = VnetHdr(VNET_F_NEEDS_CSUM, GSO_NONE, 0, 0, css, cso - css)
        if vlan is None:
            return _pack(vnet), views, (1, total)
        header, rest = _split(views, total, 0, vlan)
        return _finish(header, rest, vlan, vnet, (1, total))

    def _offload_adv(self, views: list[memoryview], total: int, cmd: int,
                     olinfo: int) -> _Out:
        ctx = self._ctx
        tse = cmd & TXD_CMD_TSE
        txsm = olinfo & TXD_POPTS_TXSM
        ixsm = olinfo & TXD_POPTS_IXSM
        vle = cmd & TXD_CMD_VLE
        if not (tse or txsm or ixsm or vle):
            return ZERO_VNET_HDR, views, (1, total)
        if ctx is None:
            raise _Drop("tx_no_context")
        vlan = ctx.vlan if vle else None
        if not (tse or txsm or ixsm):
            header, rest = _split(views, total, 0, vlan)
            return _finish(header, rest, vlan, _NO_OFFLOAD, (1, total))
        maclen, iplen = ctx.maclen, ctx.iplen
        l4 = maclen + iplen
        if maclen < ETH_HLEN or iplen < 20 or l4 > total:
            raise _Drop("tx_bad_context")
        ipv4 = bool(ctx.tucmd & TUCMD_IPV4)
        l4t = ctx.tucmd & TUCMD_L4T_MASK
        if tse:
            return self._tso(views, total, ctx, vlan, ipv4, l4t)
        vnet = _NO_OFFLOAD
        copy_end = l4 if ixsm and ipv4 else 0
        if txsm:
            if l4t == TUCMD_L4T_SCTP:
                return _sctp(views, total, maclen, iplen, copy_end != 0, vlan)
            offset = TCP_CSUM_OFFSET if l4t == TUCMD_L4T_TCP else UDP_CSUM_OFFSET
            if l4t not in (TUCMD_L4T_TCP, TUCMD_L4T_UDP) or l4 + offset + 2 > total:
                raise _Drop("tx_csum_invalid")
            vnet = VnetHdr(VNET_F_NEEDS_CSUM, GSO_NONE, 0, 0, l4, offset)
            if not copy_end and vlan is None:
                return _pack(vnet), views, (1, total)
        header, rest = _split(views, total, copy_end, vlan)
        if copy_end:
            _fix_ipv4_csum(header, maclen, iplen)
        return _finish(header, rest, vlan, vnet, (1, total))

    def _tso(self, views: list[memoryview], total: int, ctx: TxContext, vlan: int | None,
             ipv4: bool, l4t: int) -> _Out:
        maclen, iplen, l4len, mss = ctx.maclen, ctx.iplen, ctx.l4len, ctx.mss
        l4 = maclen + iplen
        hdr_len = l4 + l4len
        paylen = total - hdr_len
        if (l4t != TUCMD_L4T_TCP or l4len < 20 or l4len > 60 or not MIN_MSS <= mss <= MAX_MSS
                or paylen <= 0 or hdr_len + mss > MAX_FRAME):
            raise _Drop("tx_tso_invalid")
        ip_len = total - maclen if ipv4 else total - maclen - IPV6_HLEN
        if ip_len > 0xFFFF:
            raise _Drop("tx_oversize")
        header, rest = _split(views, total, hdr_len, vlan)
        if ipv4:
            if header[maclen] != 0x40 | (iplen // 4) or iplen % 4 or header[maclen + 9] != 6:
                raise _Drop("tx_tso_invalid")  # not plain IPv4 + TCP (e.g. a tunnel)
            struct.pack_into(">H", header, maclen + 2, ip_len)
            _fix_ipv4_csum(header, maclen, iplen)
        else:
            if header[maclen] >> 4 != 6 or (iplen == IPV6_HLEN
                                            and header[maclen + 6] != IPPROTO_TCP):
                raise _Drop("tx_tso_invalid")
            struct.pack_into(">H", header, maclen + 4, ip_len)
        if (header[l4 + 12] >> 4) * 4 != l4len:
            raise _Drop("tx_tso_invalid")
        # igbvf removed the L4 length from the pseudo-header sum; Linux GSO wants it in.
        field = l4 + TCP_CSUM_OFFSET
        seed = (header[field] << 8) | header[field + 1]
        struct.pack_into(">H", header, field, ones_add(seed, total - l4))
        gso = GSO_TCPV4 if ipv4 else GSO_TCPV6
        if header[l4 + 13] & TCP_CWR:
            gso |= GSO_ECN  # CWR on the first segment only, as the hardware does
        count = -(-paylen // mss)
        vnet = VnetHdr(VNET_F_NEEDS_CSUM, gso, hdr_len, mss, l4, TCP_CSUM_OFFSET)
        return _finish(header, rest, vlan, vnet, (count, count * hdr_len + paylen))


_Out = tuple[bytes, Sequence[BytesLike], tuple[int, int]]
"""(vnet header, frame parts, (frames, octets) it becomes on the wire)."""
_NO_OFFLOAD = VnetHdr()


def _split(views: list[memoryview], total: int, copy_end: int,
           vlan: int | None) -> tuple[bytearray, list[memoryview]]:
    """Copy the first ``copy_end`` bytes (at least the MAC addresses when a VLAN tag
    goes in) for rewriting; the rest stays as guest-memory views."""
    if vlan is not None:
        copy_end = max(copy_end, 12)
    if copy_end > total:
        raise _Drop("tx_header_beyond_frame")
    return split_prefix(views, copy_end)


def _finish(header: bytearray, rest: list[memoryview], vlan: int | None, vnet: VnetHdr,
            wire: tuple[int, int]) -> _Out:
    """Insert the VLAN tag (shifting the vnet offsets by it) and pack the header."""
    if vlan is not None:
        insert_vlan(header, vlan)
        if vnet.flags:
            vnet = vnet._replace(csum_start=vnet.csum_start + 4,
                                 hdr_len=vnet.hdr_len + 4 if vnet.hdr_len else 0)
        wire = (wire[0], wire[1] + 4 * wire[0])
    return _pack(vnet), [header, *rest], wire


def _pack(vnet: VnetHdr) -> bytes:
    """The vnet header bytes; the shared ZERO_VNET_HDR object when nothing is offloaded,
    which lets a backend without vnet headers skip the software offload step."""
    return ZERO_VNET_HDR if vnet == _NO_OFFLOAD else VNET_HDR.pack(*vnet)


def _fix_ipv4_csum(header: bytearray, maclen: int, iplen: int) -> None:
    """IXSM: the IPv4 header checksum, over the IHL bytes."""
    ver_ihl = header[maclen]
    ihl = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or ihl < 20 or ihl > iplen:
        raise _Drop("tx_csum_invalid")
    header[maclen + 10:maclen + 12] = b"\0\0"
    struct.pack_into(">H", header, maclen + 10, ipv4_header_csum(header[maclen:maclen + ihl]))


def _sctp(views: list[memoryview], total: int, maclen: int, iplen: int, ixsm: bool,
          vlan: int | None) -> _Out:
    """SCTP CRC32c in software (a vnet header cannot ask for it), over all the data."""
    l4 = maclen + iplen
    end = l4 + SCTP_CSUM_OFFSET + 4
    header, rest = _split(views, total, end, vlan)
    if ixsm:
        _fix_ipv4_csum(header, maclen, iplen)
    header[l4 + SCTP_CSUM_OFFSET:end] = bytes(4)
    crc = crc32c([memoryview(header)[l4:], *rest])
    struct.pack_into("<I", header, l4 + SCTP_CSUM_OFFSET, crc)
    return _finish(header, rest, vlan, _NO_OFFLOAD, (1, total))
