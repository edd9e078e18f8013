"""Checksum helpers, software TSO and the vnet header, checked against an independent
word-by-word checksum and hand-built frames."""

from __future__ import annotations

import os
import random
import struct

import pytest
from test_descriptors_helpers import (
    DST4,
    SRC4,
    SRC6,
    ipv4_header_ok,
    ipv4_tcp,
    ipv4_udp,
    ipv6_tcp,
    l4_ok,
    payload_bytes,
    ref_sum,
)

from vmsi_server.nic import offload as o


@pytest.mark.parametrize("n", [0, 1, 2, 3, 19, 20, 1499, 1514, 4095, 4097, 9000, 65535, 65536])
def test_ones_sum_matches_reference(n: int) -> None:
    data = os.urandom(n)
    assert o.ones_sum(data) == ref_sum(data)
    assert o.ones_sum(memoryview(bytearray(data))) == ref_sum(data)


def test_ones_sum_edge_values() -> None:
    assert o.ones_sum(b"") == 0
    assert o.ones_sum(bytes(100)) == 0
    assert o.ones_sum(b"\xff" * 5000) == 0xFFFF
    assert o.ones_sum(b"\xff\xff\x00\x01") == 1  # 0xFFFF + 1 folds to 1


def test_ones_sum_parts_any_split() -> None:
    rng = random.Random(5)
    for _ in range(50):
        data = os.urandom(rng.randrange(1, 3000))
        cuts = sorted(rng.sample(range(len(data) + 1), min(5, len(data) + 1)))
        parts = [memoryview(data)[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert o.ones_sum_parts(parts) == ref_sum(data)


def test_ones_add_sub() -> None:
    assert o.ones_add(0xFFFF, 1) == 1
    assert o.ones_add(0x1234, 0x1111) == 0x2345
    assert o.ones_sub(0x2345, 0x1111) == 0x1234
    assert o.finish_csum(0xFFFF) == 0xFFFF  # never 0


def test_ipv4_header_csum_and_pseudo() -> None:
    frame = ipv4_udp(b"x" * 11)
    ip = bytearray(frame[14:34])
    assert ipv4_header_ok(bytes(ip))
    good = struct.unpack_from(">H", ip, 10)[0]
    ip[10:12] = b"\x12\x34"  # whatever is there is ignored
    assert o.ipv4_header_csum(ip) == good
    assert o.pseudo_sum_v4(SRC4, DST4, 17, 19) == ref_sum(SRC4 + DST4 + b"\0\x11\0\x13")
    assert o.pseudo_sum_v6(SRC6, SRC6, 6, 70000) == ref_sum(
        SRC6 + SRC6 + struct.pack(">IxxxB", 70000, 6))


def test_crc32c_known_vector() -> None:
    assert o.crc32c([b"123456789"]) == 0xE3069283
    assert o.crc32c([b"1234", memoryview(b"56789")]) == 0xE3069283


def test_parse_headers() -> None:
    v4 = ipv4_tcp(b"abc", options=b"\x01\x01\x01\x01")
    h = o.parse_headers(v4)
    assert h is not None
    assert (h.l3_offset, h.ip_version, h.l4_offset, h.l4_proto, h.l4_header_len) == (
        14, 4, 34, 6, 24)
    tagged = v4[:12] + b"\x81\x00\x00\x05" + v4[12:]
    h = o.parse_headers(tagged)
    assert h is not None and h.vlan_tci == 5 and h.l3_offset == 18 and h.l4_offset == 38
    h = o.parse_headers(ipv6_tcp(b""))
    assert h is not None and (h.ip_version, h.l4_offset, h.l4_proto) == (6, 54, 6)
    h = o.parse_headers(ipv4_udp(b""))
    assert h is not None and (h.l4_proto, h.l4_header_len) == (17, 8)
    assert o.parse_headers(v4[:30]) is None
    assert o.parse_headers(b"\x00" * 12 + b"\x08\x06" + bytes(28)) is None  # ARP


def _gso_frame(v6: bool, payload: bytes, flags: int = 0x19) -> bytes:
    """A GSO super-frame as Linux builds it: IP lengths set, TCP check = pseudo-header
    sum *with* the whole L4 length."""
    f = bytearray(ipv6_tcp(payload, flags=flags) if v6 else ipv4_tcp(payload, flags=flags))
    return bytes(f)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize(("n", "mss"), [(10000, 1448), (1448 * 3, 1448), (100, 1448),
                                        (65000, 1440)])
def test_segment_tcp(v6: bool, n: int, mss: int) -> None:
    payload = payload_bytes(n)
    frame = _gso_frame(v6, payload)
    l4 = 54 if v6 else 34
    hdr = o.VnetHdr(o.VNET_F_NEEDS_CSUM, o.GSO_TCPV6 if v6 else o.GSO_TCPV4, l4 + 20, mss,
                    l4, 16)
    segs = o.apply_vnet_hdr(hdr, frame)
    assert len(segs) == -(-n // mss)
    got = b""
    for i, seg in enumerate(segs):
        seg = bytes(seg)
        assert l4_ok(seg, 14), f"segment {i} checksum"
        if not v6:
            assert ipv4_header_ok(seg[14:34])
            assert struct.unpack_from(">H", seg, 16)[0] == len(seg) - 14
            assert struct.unpack_from(">H", seg, 18)[0] == 7 + i
        else:
            assert struct.unpack_from(">H", seg, 18)[0] == len(seg) - 54
        assert struct.unpack_from(">I", seg, l4 + 4)[0] == 1000 + i * mss
        flags = seg[l4 + 13]
        last = i == len(segs) - 1
        assert bool(flags & 0x01) == last and bool(flags & 0x08) == last  # FIN, PSH
        assert flags & 0x10  # ACK everywhere
        assert len(seg) - l4 - 20 <= mss
        got += seg[l4 + 20:]
    assert got == payload


def test_segment_tcp_ecn_clears_cwr_after_first() -> None:
    frame = _gso_frame(False, payload_bytes(3000), flags=0x80 | 0x10)
    hdr = o.VnetHdr(o.VNET_F_NEEDS_CSUM, o.GSO_TCPV4 | o.GSO_ECN, 54, 1000, 34, 16)
    segs = o.apply_vnet_hdr(hdr, frame)
    assert [s[47] & 0x80 for s in segs] == [0x80, 0, 0]
    assert all(l4_ok(bytes(s), 14) for s in segs)


def test_apply_vnet_hdr_partial_checksums() -> None:
    udp = ipv4_udp(payload_bytes(333))
    (out,) = o.apply_vnet_hdr(o.VnetHdr(o.VNET_F_NEEDS_CSUM, 0, 0, 0, 34, 6), udp)
    assert l4_ok(bytes(out), 14) and out[:40] == udp[:40] and out[42:] == udp[42:]
    tcp = ipv4_tcp(payload_bytes(77))
    (out,) = o.apply_vnet_hdr(o.VnetHdr(o.VNET_F_NEEDS_CSUM, 0, 0, 0, 34, 16), tcp)
    assert l4_ok(bytes(out), 14)
    (plain,) = o.apply_vnet_hdr(o.VnetHdr(), tcp)
    assert bytes(plain) == tcp


@pytest.mark.parametrize("hdr", [
    o.VnetHdr(o.VNET_F_NEEDS_CSUM, 0, 0, 0, 34, 3100),          # field beyond the frame
    o.VnetHdr(o.VNET_F_NEEDS_CSUM, o.GSO_UDP, 54, 1000, 34, 6),  # UFO: unsupported
    o.VnetHdr(o.VNET_F_NEEDS_CSUM, o.GSO_TCPV6, 54, 1000, 34, 16),  # v6 GSO on a v4 frame
    o.VnetHdr(0, o.GSO_TCPV4, 54, 1000, 34, 16),                 # GSO without NEEDS_CSUM
    o.VnetHdr(o.VNET_F_NEEDS_CSUM, o.GSO_TCPV4, 54, 0, 34, 16),  # gso_size 0
])
def test_apply_vnet_hdr_rejects(hdr: o.VnetHdr) -> None:
    with pytest.raises(o.OffloadError):
        o.apply_vnet_hdr(hdr, ipv4_tcp(payload_bytes(3000)))


def test_split_prefix_and_vlan() -> None:
    parts = [memoryview(b"abcdef"), memoryview(b"ghij"), memoryview(b"klmnop")]
    head, rest = o.split_prefix(parts, 8)
    assert head == bytearray(b"abcdefgh") and [bytes(r) for r in rest] == [b"ij", b"klmnop"]
    head, rest = o.split_prefix(parts, 10)
    assert head == bytearray(b"abcdefghij") and [bytes(r) for r in rest] == [b"klmnop"]
    h = bytearray(b"D" * 6 + b"S" * 6 + b"\x08\x00")
    o.insert_vlan(h, 0x2064)
    assert h == b"D" * 6 + b"S" * 6 + b"\x81\x00\x20\x64\x08\x00"
