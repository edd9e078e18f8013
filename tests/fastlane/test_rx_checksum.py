"""The 82576's receive checksum check (rxcsum.c): which bits a frame gets.

Frames are built here with checksums computed by a separate, plain Python
implementation, then damaged one field at a time.
"""

from __future__ import annotations

import struct

import pytest

from vmsi_server import fastlane
from vmsi_server.nic.descriptors import (
    RXD_ERR_IPE,
    RXD_ERR_TCPE,
    RXD_STAT_IPCS,
    RXD_STAT_TCPCS,
    RXD_STAT_UDPCS,
)

check = fastlane.rx_checksum()
pytestmark = pytest.mark.skipif(check is None, reason="fast lane not built")

MACS = bytes.fromhex("525400000001") + bytes.fromhex("525400000002")
SRC4, DST4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6, DST6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
DATA_VALID = 2


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp(payload: bytes, pseudo: bytes) -> bytes:
    header = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    segment = header + payload
    value = csum(pseudo + segment)
    return segment[:16] + struct.pack("!H", value) + segment[18:]


def udp(payload: bytes, pseudo: bytes, *, zero: bool = False) -> bytes:
    segment = struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0) + payload
    if zero:
        return segment
    return segment[:6] + struct.pack("!H", csum(pseudo + segment) or 0xFFFF) + segment[8:]


def ipv4(proto: int, l4: bytes, *, frag: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0,
                         SRC4, DST4)
    header = header[:10] + struct.pack("!H", csum(header)) + header[12:]
    return MACS + b"\x08\x00" + header + l4


def pseudo4(proto: int, length: int) -> bytes:
    return SRC4 + DST4 + struct.pack("!BBH", 0, proto, length)


def tcp4(payload: bytes = b"x" * 1000) -> bytearray:
    return bytearray(ipv4(6, tcp(payload, pseudo4(6, 20 + len(payload)))))


def udp4(payload: bytes = b"y" * 301, *, zero: bool = False) -> bytearray:
    return bytearray(ipv4(17, udp(payload, pseudo4(17, 8 + len(payload)), zero=zero)))


def tcp6(payload: bytes = b"z" * 777) -> bytearray:
    length = 20 + len(payload)
    segment = tcp(payload, SRC6 + DST6 + struct.pack("!IxxxB", length, 6))
    header = struct.pack("!IHBB16s16s", 6 << 28, length, 6, 64, SRC6, DST6)
    return bytearray(MACS + b"\x86\xdd" + header + segment)


def bits(frame: bytearray, flags: int = 0) -> int:
    assert check is not None
    return check(frame, len(frame), flags)


def test_good_frames_get_the_offload_bits() -> None:
    assert bits(tcp4()) == RXD_STAT_IPCS | RXD_STAT_TCPCS
    assert bits(udp4()) == RXD_STAT_IPCS | RXD_STAT_UDPCS
    assert bits(udp4(zero=True)) == RXD_STAT_IPCS | RXD_STAT_UDPCS  # no checksum sent
    assert bits(tcp6()) == RXD_STAT_TCPCS
    assert bits(tcp4(b"odd")) == RXD_STAT_IPCS | RXD_STAT_TCPCS  # odd length


def test_a_vlan_tag_is_looked_through() -> None:
    frame = tcp4()
    tagged = frame[:12] + b"\x81\x00\x00\x05" + frame[12:]
    assert bits(tagged) == RXD_STAT_IPCS | RXD_STAT_TCPCS


def test_damaged_frames_get_the_error_bits() -> None:
    frame = tcp4()
    frame[-1] ^= 0x40  # payload
    assert bits(frame) == RXD_STAT_IPCS | RXD_STAT_TCPCS | RXD_ERR_TCPE
    frame = udp4()
    frame[-1] ^= 1
    assert bits(frame) == RXD_STAT_IPCS | RXD_STAT_UDPCS | RXD_ERR_TCPE
    frame = tcp4()
    frame[14 + 8] ^= 1  # IPv4 TTL: the header checksum no longer holds
    assert bits(frame) == RXD_STAT_IPCS | RXD_ERR_IPE
    frame = tcp6()
    frame[14 + 40 + 4] ^= 1  # TCP sequence number
    assert bits(frame) == RXD_STAT_TCPCS | RXD_ERR_TCPE


def test_the_host_kernels_word_is_taken_for_the_l4_checksum() -> None:
    frame = tcp4()
    frame[-1] ^= 0x40
    assert bits(frame, DATA_VALID) == RXD_STAT_IPCS | RXD_STAT_TCPCS


@pytest.mark.parametrize(
    "frame",
    [
        bytearray(MACS + b"\x08\x06" + b"\0" * 28),  # ARP
        bytearray(MACS + b"\x08\x00"),  # no IP header at all
        bytearray(ipv4(6, b"\0" * 10)),  # a TCP header cut short
        bytearray(ipv4(1, b"\x08\0\0\0\0\0\0\0")),  # ICMP: IP bits only
    ],
)
def test_frames_without_a_checkable_l4_get_no_l4_bits(frame: bytearray) -> None:
    assert bits(frame) & (RXD_STAT_TCPCS | RXD_STAT_UDPCS | RXD_ERR_TCPE) == 0


def test_fragments_and_lies_about_length_are_not_checked() -> None:
    fragment = bytearray(ipv4(6, tcp(b"f" * 64, pseudo4(6, 84)), frag=0x2000))
    assert bits(fragment) == RXD_STAT_IPCS
    frame = tcp4()
    frame[16:18] = struct.pack("!H", 9000)  # total length beyond the frame
    assert bits(frame) == 0
    assert bits(bytearray(b"\x01" * 13)) == 0  # shorter than an Ethernet header
