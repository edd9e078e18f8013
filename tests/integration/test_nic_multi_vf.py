"""Two VFs of one PF, switched by a Linux bridge over their taps (docs/multi-vf.md).

``vmsi-server --vfs 2 --tap tap{vf}`` in a private netns; there ``br0`` enslaves
tap0 and tap1 and carries the peer address. Each VF is driven over its own
socket like igbvf would; frames one VF sends reach the other through the
bridge, and the bridge's own address answers ARP from either.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsi_server.client.client import VfioUserClient
from vmsi_server.nic import registers as r
from vmsi_server.nic.descriptors import TXD_CMD_EOP, TXD_CMD_RS
from vmsi_server.nic.pf import DEFAULT_BASE_MAC

from .test_nic_bad_input import (
    RX_BUF,
    RX_BUFLEN,
    RX_RING,
    TX_BUF,
    Driver,
    NsServer,
    eth_frame,
    ns_server_running,
    pytestmark,  # noqa: F401  (the same root / tun requirement)
)

MACS = [DEFAULT_BASE_MAC[:5] + bytes([DEFAULT_BASE_MAC[5] + i]) for i in range(2)]
BRIDGE_IP = "10.0.0.1"
BRIDGE_CMDS = [
    ["ip", "link", "add", "br0", "type", "bridge"],
    ["ip", "link", "set", "tap0", "master", "br0"],
    ["ip", "link", "set", "tap1", "master", "br0"],
    ["ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", "br0"],
    ["ip", "link", "set", "br0", "up"],
]


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[NsServer]:
    with ns_server_running(tmp_path, vfs=2, macs=()) as server:
        for cmd in BRIDGE_CMDS:
            server.exec(*cmd)
        server.exec("sysctl", "-qw", "net.ipv6.conf.br0.disable_ipv6=1")
        yield server


def up(client: VfioUserClient, mac: bytes) -> Driver:
    d = Driver(client, mac=mac)
    d.bring_up()
    d.tx_ring()
    d.rx_ring()
    for i in range(16):
        d.put(RX_RING + 16 * i, struct.pack("<QQ", RX_BUF + 2 * RX_BUFLEN * i, 0))
    d.wr(r.RDT0, 15)
    return d


def received(d: Driver, count: int, timeout: float = 5.0) -> list[bytes]:
    """Wait for ``count`` RX write-backs; return those frames."""
    deadline = time.monotonic() + timeout
    while d.rd(r.RDH0) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    frames = []
    for slot in range(d.rd(r.RDH0)):
        status, length = struct.unpack_from("<IH", d.ram.read(RX_RING + 16 * slot + 8, 6))
        assert status & 0x3 == 0x3
        frames.append(d.ram.read(RX_BUF + 2 * RX_BUFLEN * slot, length))
    return frames


def bridged_mac(server: NsServer) -> bytes:
    out = server.exec("cat", "/sys/class/net/br0/address").stdout.strip()
    return bytes.fromhex(out.replace(":", ""))


def send(d: Driver, slot: int, frame: bytes) -> None:
    buf = TX_BUF + 2048 * slot
    d.put(buf, frame)
    d.tx_desc(slot, buf, len(frame), TXD_CMD_EOP | TXD_CMD_RS)
    d.doorbell(slot + 1)


def arp_request(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    return (b"\xff" * 6 + src_mac + b"\x08\x06"
            + struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac, src_ip,
                          bytes(6), target_ip))


def test_two_vfs_distinct_stable_macs_switched_by_a_bridge(bridged: NsServer,
                                                          tmp_path: Path) -> None:
    snap = bridged.counters()["devices"]
    assert [snap[f"vf{i}"]["mac"] for i in range(2)] == [m.hex(":") for m in MACS]
    with (VfioUserClient(bridged.sockets[0]) as c0,
          VfioUserClient(bridged.sockets[1]) as c1):
        vf0, vf1 = up(c0, MACS[0]), up(c1, MACS[1])  # each checks VF_RESET's MAC

        # VF0 -> VF1 and back, through br0.
        to1 = eth_frame(b"vf0 to vf1 " * 5, dst=MACS[1], src=MACS[0])
        to0 = eth_frame(b"vf1 to vf0 " * 5, dst=MACS[0], src=MACS[1])
        send(vf0, 0, to1)
        assert received(vf1, 1) == [to1]
        send(vf1, 0, to0)
        assert received(vf0, 1) == [to0]

        # The peer address on br0 answers ARP from each VF (each VF also sees the
        # other's broadcast request: the bridge floods it).
        for i, d in enumerate((vf0, vf1)):
            send(d, 1, arp_request(MACS[i], bytes([10, 0, 0, 2 + i]), bytes([10, 0, 0, 1])))
        for i, d in enumerate((vf0, vf1)):
            frames = received(d, 3)
            assert len(frames) == 3, [f.hex() for f in frames]
            replies = [f for f in frames if f[:6] == MACS[i] and f[12:14] == b"\x08\x06"]
            assert len(replies) == 1, [f.hex() for f in frames]
            assert struct.unpack_from(">H", replies[0], 20)[0] == 2  # ARP reply
            assert replies[0][28:32] == bytes([10, 0, 0, 1])
            assert replies[0][6:12] == bridged_mac(bridged)
            other = [f for f in frames if f[:6] == b"\xff" * 6]
            assert len(other) == 1 and other[0][6:12] == MACS[1 - i]

        # A broadcast from VF0 reaches VF1 (and the bridge), not VF0 itself.
        bcast = eth_frame(b"to all" * 10, dst=b"\xff" * 6, src=MACS[0])
        send(vf0, 2, bcast)
        assert received(vf1, 4)[3] == bcast
        assert len(received(vf0, 4, timeout=0.5)) == 3

        n0, n1 = bridged.nic(0), bridged.nic(1)
        assert n0["gptc"] == 3 and n1["gptc"] == 2
        assert n0["gprc"] == 3 and n1["gprc"] == 4
        fdb = bridged.exec("bridge", "fdb", "show", "br", "br0").stdout
        assert MACS[0].hex(":") in fdb and MACS[1].hex(":") in fdb

        # A function-level reset keeps each VF's MAC: VF_RESET hands out the same one.
        c1.reset()
        vf1b = Driver.__new__(Driver)
        vf1b.c, vf1b.mac, vf1b.ram, vf1b.irq_fds = c1, MACS[1], vf1.ram, []
        vf1b.bring_up()
        for fd in vf0.irq_fds + vf1.irq_fds + vf1b.irq_fds:
            os.close(fd)
    assert bridged.alive()


def test_macs_are_the_same_after_a_restart(tmp_path: Path) -> None:
    """Stable: derived from the VF index, not random per run."""
    seen = []
    for run in range(2):
        path = tmp_path / f"run{run}"
        path.mkdir()
        with ns_server_running(path, vfs=2, macs=()) as server:
            devices = server.counters()["devices"]
            seen.append([devices[f"vf{i}"]["mac"] for i in range(2)])
    assert seen[0] == seen[1] == [m.hex(":") for m in MACS]
    assert seen[0][0] != seen[0][1]
