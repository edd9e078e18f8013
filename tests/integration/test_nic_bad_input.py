"""Guest garbage through a real server: the VF keeps serving and writes nowhere it may not.

A real ``vmsi-server`` subprocess runs in a private network namespace with
``--tap tap0``; the test drives it like igbvf would (config Command bus master,
MSI-X enable, the mailbox VF_RESET handshake, ring registers, TXDCTL/RXDCTL),
with "guest RAM" from ``client.map_ram`` (a memfd mapped on both sides). Every
byte of that RAM starts as a sentinel; after each bad input the test checks that
the server wrote only where a device may (descriptor write-backs inside the
ring, RX data inside the posted buffer lengths), that the drop counters on the
control socket moved, that a config read still answers, and that the work one
doorbell causes stays bounded. The good path sends a frame that must appear on
the tap (read with an AF_PACKET socket inside the namespace) and receives one
injected from the namespace.

Needs root and /dev/net/tun (network namespaces); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsi_server.client.client import GuestRam, VfioUserClient
from vmsi_server.nic import registers as r
from vmsi_server.nic.descriptors import (
    TUCMD_IPV4,
    TUCMD_L4T_TCP,
    TXD_CMD_DEXT,
    TXD_CMD_EOP,
    TXD_CMD_IFCS,
    TXD_CMD_RS,
    TXD_CMD_TSE,
    TXD_DTYP_DATA,
    TXD_POPTS_IXSM,
    TXD_POPTS_TXSM,
    TxContextDesc,
)
from vmsi_server.protocol.constants import RegionIndex
from vmsi_server.telemetry.control import query

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2 (private network namespace + tap)",
)

BAR0 = RegionIndex.BAR0
CONFIG = RegionIndex.CONFIG
VF_MAC = bytes.fromhex("02760a000020")
PEER_MAC = bytes.fromhex("02aabbccdd01")
ETH_P_TEST = 0x88B5  # IEEE local experimental ethertype: nothing else sends it

RAM_IOVA = 0x1000_0000
RAM_SIZE = 4 << 20
TX_RING = RAM_IOVA + 0x1000  # 16 descriptors (256 bytes) by default
RX_RING = RAM_IOVA + 0x2000
TX_BUF = RAM_IOVA + 0x10000
RX_BUF = RAM_IOVA + 0x40000  # 16 buffers of 2 KiB, each followed by sentinel
BIG_RING = RAM_IOVA + 0x100000  # room for a 1 MiB ring
SENTINEL = 0xA5
RX_BUFLEN = 2048
PROMPT = 1.0
"""Generous bound for a synchronous read right after a doorbell (seconds)."""


# -- the server in a netns ------------------------------------------------------------


@dataclass
class NsServer:
    netns: str
    proc: subprocess.Popen[bytes]
    sockets: list[str]
    control_path: str
    log_path: Path

    @property
    def socket_path(self) -> str:
        return self.sockets[0]

    def counters(self) -> dict:  # type: ignore[type-arg]
        return query(self.control_path)

    def nic(self, vf: int = 0) -> dict[str, int]:
        return self.counters()["devices"][f"vf{vf}"]["nic"]  # type: ignore[no-any-return]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv],
                              check=True, capture_output=True, text=True)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@contextmanager
def ns_server_running(tmp_path: Path, vfs: int = 1, macs: tuple[bytes, ...] = (VF_MAC,),
                      extra: tuple[str, ...] = ()) -> Iterator[NsServer]:
    """``vmsi-server --vfs N --tap tap{vf} EXTRA...`` in a fresh netns; the taps are up."""
    netns = f"vmsi-nicbad-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    _ip("netns", "add", netns)
    proc: subprocess.Popen[bytes] | None = None
    try:
        _ip("-n", netns, "link", "set", "lo", "up")
        sockets = [str(tmp_path / f"vf{i}.sock") for i in range(vfs)]
        ctl = str(tmp_path / "vf.ctl")
        log_path = tmp_path / "server.log"
        repo = Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p))
        argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "vmsi_server",
                "--socket-path", str(tmp_path / "vf{vf}.sock"), "--vfs", str(vfs),
                "--control-socket", ctl, "--tap", "tap{vf}", "--no-slowpath"]
        for mac in macs:
            argv += ["--mac", mac.hex(":")]
        argv += extra
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 15
        while not all(os.path.exists(p) for p in [*sockets, ctl]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
            time.sleep(0.02)
        for i in range(vfs):
            tap = f"tap{i}"
            # The netns end of the wire: keep IPv6 quiet so only our frames appear.
            subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw",
                            f"net.ipv6.conf.{tap}.disable_ipv6=1"], capture_output=True)
            _ip("-n", netns, "link", "set", tap, "address",
                (PEER_MAC[:5] + bytes([PEER_MAC[5] + i])).hex(":"), "mtu", "9000", "up")
        yield NsServer(netns, proc, sockets, ctl, log_path)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


@pytest.fixture
def ns_server(tmp_path: Path) -> Iterator[NsServer]:
    with ns_server_running(tmp_path) as server:
        yield server


# -- a driver on the client side ------------------------------------------------------


class Driver:
    """What igbvf does to bring the VF up, over the project's client."""

    def __init__(self, client: VfioUserClient, mac: bytes = VF_MAC) -> None:
        self.c = client
        self.mac = mac
        self.ram: GuestRam = client.map_ram(RAM_IOVA, RAM_SIZE)
        self.ram.mem[:] = bytes([SENTINEL]) * RAM_SIZE
        self.irq_fds: list[int] = []
        self.tx_n = 0
        self.rx_n = 0

    # registers
    def wr(self, offset: int, value: int, *, posted: bool = True) -> None:
        self.c.write32(BAR0, offset, value, posted=posted)

    def rd(self, offset: int) -> int:
        return self.c.read32(BAR0, offset)

    def bring_up(self) -> None:
        c = self.c
        # Memory decoding + bus mastering (Command register).
        c.region_write(CONFIG, 0x04, struct.pack("<H", 0x0006))
        # MSI-X: eventfds for the 3 vectors, then Message Control enable.
        self.irq_fds = c.install_msix_eventfds(3)
        c.region_write(CONFIG, 0x72, struct.pack("<H", 0x8000))
        # Reset and the mailbox VF_RESET handshake (igbvf.md §4, §9.1).
        self.wr(r.CTRL, r.CTRL_RST)
        self.rd(r.V2PMAILBOX)  # RSTD, read-to-clear
        assert not self.rd(r.V2PMAILBOX) & (r.V2P_RSTD | r.V2P_RSTI)
        self.wr(r.V2PMAILBOX, r.V2P_VFU)
        assert self.rd(r.V2PMAILBOX) & r.V2P_VFU
        self.wr(r.VMBMEM, 0x00000001)  # VF_RESET
        self.wr(r.V2PMAILBOX, r.V2P_REQ)
        assert self.rd(r.V2PMAILBOX) & r.V2P_PFACK
        words = [self.rd(r.VMBMEM + 4 * i) for i in range(3)]
        self.wr(r.V2PMAILBOX, r.V2P_ACK)
        assert words[0] == 0x80000001, hex(words[0])
        mac = struct.pack("<II", words[1], words[2])[:6]
        assert mac == self.mac
        # Interrupt routing as igbvf programs it.
        self.wr(r.IVAR0, 0x00008081)
        self.wr(r.IVAR_MISC, 0x82)
        self.wr(r.EIAC, 0x7)
        self.wr(r.EIAM, 0x7)
        self.wr(r.EIMS, 0x7)

    def tx_ring(self, base: int = TX_RING, count: int = 16, enable: bool = True) -> None:
        self.wr(r.TXDCTL0, 0)
        self.wr(r.TDBAL0, base & 0xFFFFFFFF)
        self.wr(r.TDBAH0, base >> 32)
        self.wr(r.TDLEN0, count * 16)
        self.wr(r.TDH0, 0)
        self.wr(r.TDT0, 0)
        self.tx_n = count
        if enable:
            self.wr(r.TXDCTL0, r.XDCTL_ENABLE)

    def rx_ring(self, base: int = RX_RING, count: int = 16) -> None:
        self.wr(r.RXDCTL0, 0)
        self.wr(r.RDBAL0, base & 0xFFFFFFFF)
        self.wr(r.RDBAH0, base >> 32)
        self.wr(r.RDLEN0, count * 16)
        self.wr(r.SRRCTL0, 0x82000002)
        self.wr(r.RDH0, 0)
        self.wr(r.RDT0, 0)
        self.rx_n = count
        self.wr(r.RXDCTL0, 0x02010810)

    # descriptors
    def put(self, iova: int, data: bytes) -> None:
        self.ram.write(iova, data)

    def tx_desc(self, slot: int, addr: int, length: int, cmd: int = 0, olinfo: int = 0,
                base: int = TX_RING) -> None:
        self.put(base + 16 * slot, struct.pack(
            "<QII", addr, TXD_CMD_DEXT | TXD_DTYP_DATA | TXD_CMD_IFCS | cmd | length, olinfo))

    def tx_ctx(self, slot: int, desc: TxContextDesc, base: int = TX_RING) -> None:
        self.put(base + 16 * slot, desc.pack())

    def doorbell(self, tail: int) -> float:
        """TDT write (posted, like QEMU), then the time until a config read answers."""
        t0 = time.monotonic()
        self.wr(r.TDT0, tail)
        assert self.c.read32(CONFIG, 0) == 0x10CA8086
        return time.monotonic() - t0


@pytest.fixture
def drv(ns_server: NsServer) -> Iterator[Driver]:
    with VfioUserClient(ns_server.socket_path, timeout=10.0) as client:
        d = Driver(client)
        d.bring_up()
        yield d
        for fd in d.irq_fds:
            os.close(fd)


# -- checks ---------------------------------------------------------------------------


_expected: dict[int, bytes] = {}


def snapshot(ram: GuestRam) -> None:
    """Remember the RAM as the test left it (sentinels and all)."""
    _expected[id(ram)] = bytes(ram.mem)


def changed_ranges(ram: GuestRam, allowed: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """IOVA ranges whose bytes differ from the last ``snapshot``, outside ``allowed``."""
    before = _expected[id(ram)]
    now = bytes(ram.mem)
    spans = sorted((a - ram.iova, b - ram.iova) for a, b in allowed)
    bad: list[tuple[int, int]] = []
    pos = 0
    for a, b in [*spans, (len(now), len(now))]:
        if pos < a:
            bad += _diff_runs(before, now, pos, a)
        pos = max(pos, b)
    return [(ram.iova + i, ram.iova + j) for i, j in bad]


def _diff_runs(before: bytes, now: bytes, start: int, end: int,
               block: int = 4096) -> list[tuple[int, int]]:
    """Differing [i, j) runs in [start, end): equal blocks are skipped in C."""
    runs: list[tuple[int, int]] = []
    i = start
    while i < end:
        j = min(i + block, end)
        if before[i:j] == now[i:j]:
            i = j
            continue
        k = i
        while k < j:
            if before[k] != now[k]:
                m = k
                while m < end and before[m] != now[m]:
                    m += 1
                runs.append((k, m))
                k = m
            else:
                k += 1
        i = max(j, k)
    return runs


def drops(server: NsServer) -> dict[str, int]:
    return {k[5:]: v for k, v in server.nic().items() if k.startswith("drop.")}


def still_serving(server: NsServer, drv: Driver) -> None:
    assert server.alive(), server.log_path.read_text()[-3000:]
    assert drv.c.read32(CONFIG, 0) == 0x10CA8086
    assert drv.rd(r.STATUS) == r.STATUS_LINK_UP


def status_dwords(base: int, count: int) -> list[tuple[int, int]]:
    """Where a TX write-back may land: the status dword (bytes 12-15) of each slot."""
    return [(base + 16 * i + 12, base + 16 * i + 16) for i in range(count)]


# -- packet capture inside the namespace ----------------------------------------------

CAPTURE = textwrap.dedent("""
    import json, socket, sys, time
    ETH_P_ALL = 3
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((sys.argv[3], 0))
    s.settimeout(0.2)
    want, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
    print("READY", flush=True)
    got = 0
    while got < want and time.monotonic() < deadline:
        try:
            data, addr = s.recvfrom(1 << 17)
        except TimeoutError:
            continue
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        print(json.dumps(data.hex()), flush=True)
        got += 1
""")

SEND = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((sys.argv[1], 0))
    for frame in sys.argv[2:]:
        s.send(bytes.fromhex(frame))
""")


class Capture:
    """An AF_PACKET reader on tap0 in the namespace, started before the traffic."""

    def __init__(self, server: NsServer, frames: int, timeout: float = 5.0,
                 tap: str = "tap0") -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", server.netns, sys.executable, "-c", CAPTURE,
             str(frames), str(timeout), tap],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", self.proc.stderr.read() if self.proc.stderr else line

    def frames(self, match: int | None = ETH_P_TEST) -> list[bytes]:
        out, _err = self.proc.communicate(timeout=30)
        frames = [bytes.fromhex(json.loads(x)) for x in out.splitlines() if x.strip()]
        if match is not None:
            frames = [f for f in frames if len(f) >= 14 and
                      struct.unpack_from(">H", f, 12)[0] == match]
        return frames


def inject(server: NsServer, *frames: bytes, tap: str = "tap0") -> None:
    server.exec(sys.executable, "-c", SEND, tap, *(f.hex() for f in frames))


def eth_frame(payload: bytes, dst: bytes = PEER_MAC, src: bytes = VF_MAC) -> bytes:
    return dst + src + struct.pack(">H", ETH_P_TEST) + payload


# -- the good path --------------------------------------------------------------------


def test_valid_tx_descriptor_produces_the_frame_on_the_tap(ns_server: NsServer,
                                                          drv: Driver) -> None:
    drv.tx_ring()
    frame = eth_frame(b"vmsi good path " + bytes(range(64)))
    drv.put(TX_BUF, frame)
    drv.tx_desc(0, TX_BUF, len(frame), TXD_CMD_EOP | TXD_CMD_RS)
    snapshot(drv.ram)
    cap = Capture(ns_server, 1)
    assert drv.doorbell(1) < PROMPT
    got = cap.frames()
    assert got == [frame]
    # DD written back into the descriptor's status dword, nowhere else.
    assert struct.unpack_from("<I", drv.ram.read(TX_RING + 12, 4))[0] & 1
    assert changed_ranges(drv.ram, status_dwords(TX_RING, 1)) == []
    assert drv.rd(r.TDH0) == 1
    nic = ns_server.nic()
    assert nic["gptc"] == 1 and nic["gotc"] == len(frame)
    assert nic["irq.sent.0"] == 1  # TX cause -> vector 0, then auto-masked


def test_tso_super_frame_reaches_the_tap_segmented_by_the_kernel(ns_server: NsServer,
                                                                 drv: Driver) -> None:
    """A TSE packet leaves as one GSO frame (counted), the kernel segments it."""
    drv.tx_ring()
    mss, payload = 1000, bytes(i % 251 for i in range(3500))
    eth = PEER_MAC + VF_MAC + b"\x08\x00"
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 0, 7, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]))
    tcp = struct.pack(">HHIIBBHHH", 40000, 5201, 1000, 0, 5 << 4, 0x18, 65535, 0, 0)
    frame = eth + ip + tcp + payload
    drv.put(TX_BUF, frame)
    drv.tx_ctx(0, TxContextDesc.build(14, 20, TUCMD_IPV4 | TUCMD_L4T_TCP, l4len=20, mss=mss))
    drv.tx_desc(1, TX_BUF, len(frame), TXD_CMD_EOP | TXD_CMD_RS | TXD_CMD_TSE,
                (len(payload) << 14) | TXD_POPTS_TXSM | TXD_POPTS_IXSM)
    cap = Capture(ns_server, 4, timeout=3.0)
    assert drv.doorbell(2) < PROMPT
    seen = cap.frames(match=0x0800)
    nic = ns_server.nic()
    assert nic["tx_tso_frames"] == 1 and nic["tx_tso_segments"] == 4, nic
    assert nic["gptc"] == 4
    # Whatever shape the packet socket sees (one GSO skb or segments), the TCP payload
    # bytes are all there, in order.
    data = b"".join(f[14 + 20 + 20:14 + struct.unpack_from(">H", f, 16)[0]] for f in seen)
    assert data == payload, (len(data), [len(f) for f in seen])


def test_rx_frame_from_the_namespace_lands_in_the_posted_buffer(ns_server: NsServer,
                                                                drv: Driver) -> None:
    drv.rx_ring()
    for i in range(16):
        drv.put(RX_RING + 16 * i, struct.pack("<QQ", RX_BUF + 2 * RX_BUFLEN * i, 0))
    snapshot(drv.ram)
    drv.wr(r.RDT0, 15)
    frame = VF_MAC + PEER_MAC + struct.pack(">H", ETH_P_TEST) + b"to the guest" * 8
    inject(ns_server, frame)
    deadline = time.monotonic() + 5
    while drv.rd(r.RDH0) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert drv.rd(r.RDH0) == 1
    status, length = struct.unpack_from("<IH", drv.ram.read(RX_RING + 8, 6))
    assert status & 0x3 == 0x3 and length == len(frame)
    assert drv.ram.read(RX_BUF, len(frame)) == frame
    # Only descriptor 0 and the first buffer's frame bytes changed.
    assert changed_ranges(drv.ram, [(RX_RING, RX_RING + 16),
                                    (RX_BUF, RX_BUF + len(frame))]) == []
    assert ns_server.nic()["gprc"] == 1


# -- bad rings ------------------------------------------------------------------------


def test_tx_ring_outside_guest_memory(ns_server: NsServer, drv: Driver) -> None:
    drv.tx_ring(base=0x7F00_0000)  # nothing mapped there
    snapshot(drv.ram)
    assert drv.doorbell(5) < PROMPT
    assert drops(ns_server).get("tx_ring_dma", 0) >= 1
    # A ring that starts inside RAM and runs past its end.
    drv.tx_ring(base=RAM_IOVA + RAM_SIZE - 128, count=64)
    assert drv.doorbell(40) < PROMPT
    assert drops(ns_server)["tx_ring_dma"] >= 2
    assert changed_ranges(drv.ram, []) == []
    still_serving(ns_server, drv)


def test_rings_in_a_mapping_without_fd(ns_server: NsServer, drv: Driver) -> None:
    """QEMU maps ROMs without an fd: such ranges exist but cannot be accessed."""
    hole = 0x2000_0000
    drv.c.dma_map(hole, 1 << 20, None)
    drv.tx_ring(base=hole)
    drv.rx_ring(base=hole)
    snapshot(drv.ram)
    assert drv.doorbell(3) < PROMPT
    drv.wr(r.RDT0, 8)
    inject(ns_server, eth_frame(b"x" * 60, dst=VF_MAC))
    time.sleep(0.3)
    d = drops(ns_server)
    assert d.get("tx_ring_dma", 0) >= 1, d
    assert d.get("rx_ring_dma", 0) >= 1, d
    assert changed_ranges(drv.ram, []) == []
    still_serving(ns_server, drv)


@pytest.mark.parametrize("tdlen", [0, 100, 0xFFFF_FFFF])
def test_absurd_tx_ring_lengths(ns_server: NsServer, drv: Driver, tdlen: int) -> None:
    """0 and non-multiples of 128 are invalid; all-ones is masked to the largest ring."""
    drv.tx_ring(base=BIG_RING)
    drv.wr(r.TDLEN0, tdlen)
    snapshot(drv.ram)
    t = drv.doorbell(0xFFFF)
    assert t < PROMPT, f"doorbell with TDLEN {tdlen:#x} took {t:.3f} s"
    d = drops(ns_server)
    if tdlen == 0xFFFF_FFFF:
        # 65528 descriptors of sentinel garbage: walked once, bounded, no writes
        # outside the ring (sentinel descriptors have RS set: DD lands in the ring).
        assert drv.rd(r.TDLEN0) == r.RING_LEN_MASK
        assert changed_ranges(drv.ram, [(BIG_RING, BIG_RING + r.RING_LEN_MASK)]) == []
        assert sum(d.values()) >= 1, d
    else:
        assert d.get("tx_ring_invalid", 0) >= 1, d
        assert changed_ranges(drv.ram, []) == []
    still_serving(ns_server, drv)


def test_giant_ring_of_valid_packets_is_bounded(ns_server: NsServer, drv: Driver) -> None:
    """The largest ring full of real one-descriptor packets: the next read still answers
    within the bound, and every descriptor is completed exactly once."""
    n = r.RING_LEN_MASK // 16
    drv.tx_ring(base=BIG_RING, count=n)
    frame = eth_frame(b"flood" * 12)
    drv.put(TX_BUF, frame)
    desc = struct.pack("<QII", TX_BUF, TXD_CMD_DEXT | TXD_DTYP_DATA | TXD_CMD_EOP | TXD_CMD_RS
                       | len(frame), 0)
    drv.put(BIG_RING, desc * n)
    snapshot(drv.ram)
    t = drv.doorbell(n - 1)
    print(f"doorbell with {n - 1} packets: next read after {t * 1e3:.0f} ms")
    assert t < PROMPT, f"{n - 1} packets in one doorbell: next read after {t:.3f} s"
    deadline = time.monotonic() + 30
    while drv.rd(r.TDH0) != n - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert drv.rd(r.TDH0) == n - 1
    assert changed_ranges(drv.ram, status_dwords(BIG_RING, n - 1)) == []
    nic = ns_server.nic()
    assert nic["gptc"] + sum(v for k, v in nic.items() if k.startswith("drop.")) >= n - 1
    still_serving(ns_server, drv)


def test_chains_across_the_per_call_budget_all_go_out(ns_server: NsServer,
                                                      drv: Driver) -> None:
    """3-descriptor packets over a 4096-descriptor ring in one doorbell: the server
    works through it in budget-sized steps; a chain cut by a step boundary is resumed,
    not dropped or sent twice."""
    n = 4096
    drv.tx_ring(base=BIG_RING, count=n)
    frame = eth_frame(bytes(range(256)) * 2)
    cuts = (0, 100, 400, len(frame))
    drv.put(TX_BUF, frame)
    descs = []
    for k in range(3):
        cmd = TXD_CMD_DEXT | TXD_DTYP_DATA | TXD_CMD_IFCS | (cuts[k + 1] - cuts[k])
        if k == 2:
            cmd |= TXD_CMD_EOP | TXD_CMD_RS
        descs.append(struct.pack("<QII", TX_BUF + cuts[k], cmd, 0))
    packets = (n - 1) // 3
    drv.put(BIG_RING, b"".join(descs) * packets)
    snapshot(drv.ram)
    assert drv.doorbell(packets * 3) < PROMPT
    deadline = time.monotonic() + 30
    while drv.rd(r.TDH0) != packets * 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert drv.rd(r.TDH0) == packets * 3
    nic = ns_server.nic()
    assert nic["gptc"] == packets and nic["gotc"] == packets * len(frame)
    assert {k: v for k, v in drops(ns_server).items() if k.startswith("tx_")} == {}
    rs_slots = [(BIG_RING + 16 * (3 * p + 2) + 12, BIG_RING + 16 * (3 * p + 2) + 16)
                for p in range(packets)]
    assert changed_ranges(drv.ram, rs_slots) == []
    for p in range(packets):
        assert drv.ram.read(BIG_RING + 16 * (3 * p + 2) + 12, 1) == b"\x01"
    still_serving(ns_server, drv)


def test_absurd_rx_ring_length_and_pointers(ns_server: NsServer, drv: Driver) -> None:
    drv.rx_ring(base=BIG_RING)
    drv.wr(r.RDLEN0, 0xFFFF_FFFF)  # masked to the 1 MiB maximum: a valid, huge ring
    snapshot(drv.ram)
    t0 = time.monotonic()
    drv.wr(r.RDT0, 0xFFFF)  # beyond the ring (65528 descriptors)
    inject(ns_server, eth_frame(b"r" * 60, dst=VF_MAC))
    time.sleep(0.3)
    assert time.monotonic() - t0 < PROMPT + 1
    assert drops(ns_server).get("rx_ring_pointer", 0) >= 1
    drv.wr(r.RDLEN0, 0)
    drv.wr(r.RDT0, 4)
    inject(ns_server, eth_frame(b"s" * 60, dst=VF_MAC))
    time.sleep(0.3)
    assert drops(ns_server).get("rx_ring_invalid", 0) >= 1
    assert changed_ranges(drv.ram, []) == []
    still_serving(ns_server, drv)


def test_head_and_tail_beyond_the_ring(ns_server: NsServer, drv: Driver) -> None:
    drv.tx_ring()
    snapshot(drv.ram)
    assert drv.doorbell(200) < PROMPT  # 16-descriptor ring
    assert drops(ns_server).get("tx_ring_pointer", 0) == 1
    drv.wr(r.TDH0, 0xFFFF)
    assert drv.doorbell(3) < PROMPT
    assert drops(ns_server)["tx_ring_pointer"] == 2
    assert changed_ranges(drv.ram, []) == []
    # The ring recovers once the driver resets its pointers.
    drv.tx_ring()
    frame = eth_frame(b"after recovery")
    drv.put(TX_BUF, frame)
    drv.tx_desc(0, TX_BUF, len(frame), TXD_CMD_EOP | TXD_CMD_RS)
    cap = Capture(ns_server, 1)
    drv.doorbell(1)
    assert cap.frames() == [frame]
    still_serving(ns_server, drv)


# -- bad descriptors ------------------------------------------------------------------


def test_zero_and_oversized_buffer_lengths(ns_server: NsServer, drv: Driver) -> None:
    drv.tx_ring()
    drv.put(TX_BUF, eth_frame(b"z" * 50))
    eop_rs = TXD_CMD_EOP | TXD_CMD_RS
    drv.tx_desc(0, TX_BUF, 0, eop_rs)  # zero length
    drv.tx_desc(1, RAM_IOVA + RAM_SIZE - 100, 200, eop_rs)  # runs past the RAM
    drv.tx_desc(2, TX_BUF, 0xFFFF, 0)  # 64 KiB x 2: more than a non-TSO frame may be
    drv.tx_desc(3, TX_BUF, 0xFFFF, eop_rs)
    drv.tx_desc(4, 0xDEAD_0000_0000, 60, eop_rs)  # not mapped at all
    snapshot(drv.ram)
    cap = Capture(ns_server, 1, timeout=1.0)
    assert drv.doorbell(5) < PROMPT
    assert cap.frames() == []  # nothing left for the wire
    d = drops(ns_server)
    assert d.get("tx_zero_length") == 1, d
    assert d.get("tx_dma", 0) == 2, d
    assert d.get("tx_oversize") == 1, d
    # All completed (DD where RS), TDH past them: the driver can reclaim them.
    assert drv.rd(r.TDH0) == 5
    assert changed_ranges(drv.ram, status_dwords(TX_RING, 5)) == []
    still_serving(ns_server, drv)


def test_chains_without_eop(ns_server: NsServer, drv: Driver) -> None:
    """A chain filling the ring with no EOP is dropped, not waited for forever; a short
    one is kept until the driver finishes it."""
    drv.tx_ring()
    frame = eth_frame(b"c" * 100)
    drv.put(TX_BUF, frame)
    for i in range(15):
        drv.tx_desc(i, TX_BUF, 10, TXD_CMD_RS)  # no EOP anywhere
    snapshot(drv.ram)
    assert drv.doorbell(15) < PROMPT  # ring full (15 of 16)
    assert drops(ns_server).get("tx_chain_too_long") == 1
    assert drv.rd(r.TDH0) == 15
    assert changed_ranges(drv.ram, status_dwords(TX_RING, 16)) == []
    # Discarding continues up to the next EOP; the packet after it goes out.
    drv.tx_desc(15, TX_BUF, 10, TXD_CMD_EOP | TXD_CMD_RS)
    drv.tx_desc(0, TX_BUF, len(frame), TXD_CMD_EOP | TXD_CMD_RS)
    cap = Capture(ns_server, 1)
    drv.doorbell(1)
    assert cap.frames() == [frame]
    still_serving(ns_server, drv)


@pytest.mark.parametrize(
    ("maclen", "iplen", "l4len", "mss", "reason"),
    [
        (0, 0, 0, 0, "tx_bad_context"),
        (14, 20, 255, 1448, "tx_tso_invalid"),  # L4LEN beyond any TCP header
        (14, 20, 20, 0, "tx_tso_invalid"),  # MSS 0: infinitely many segments
        (14, 20, 20, 1, "tx_tso_invalid"),  # MSS 1: thousands of segments
        (127, 511, 60, 1448, "tx_bad_context"),  # headers longer than the packet
        (14, 24, 20, 1448, "tx_tso_invalid"),  # IPLEN disagrees with the IHL
    ],
)
def test_tso_with_garbage_header_lengths(ns_server: NsServer, drv: Driver, maclen: int,
                                         iplen: int, l4len: int, mss: int,
                                         reason: str) -> None:
    drv.tx_ring()
    eth = PEER_MAC + VF_MAC + b"\x08\x00"
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 0, 1, 0, 64, 6, 0, b"\n\0\0\2", b"\n\0\0\1")
    tcp = struct.pack(">HHIIBBHHH", 1, 2, 0, 0, 5 << 4, 0x10, 0, 0, 0)
    frame = eth + ip + tcp + bytes(400)
    drv.put(TX_BUF, frame)
    drv.tx_ctx(0, TxContextDesc.build(maclen, iplen, TUCMD_IPV4 | TUCMD_L4T_TCP,
                                      l4len=l4len, mss=mss))
    drv.tx_desc(1, TX_BUF, len(frame), TXD_CMD_EOP | TXD_CMD_RS | TXD_CMD_TSE,
                (400 << 14) | TXD_POPTS_TXSM)
    snapshot(drv.ram)
    assert drv.doorbell(2) < PROMPT
    d = drops(ns_server)
    assert d.get(reason) == 1, d
    nic = ns_server.nic()
    assert nic["tx_tso_frames"] == 0 and nic["gptc"] == 0
    assert drv.rd(r.TDH0) == 2
    assert changed_ranges(drv.ram, status_dwords(TX_RING, 2)) == []
    still_serving(ns_server, drv)


def test_rx_buffers_outside_memory_and_oversized_frames(ns_server: NsServer,
                                                        drv: Driver) -> None:
    drv.rx_ring()
    drv.put(RX_RING, struct.pack("<QQ", 0xBAD0_0000_0000, 0))  # unmapped buffer
    drv.put(RX_RING + 16, struct.pack("<QQ", RAM_IOVA + RAM_SIZE - 100, 0))  # runs off
    for i in range(2, 16):
        drv.put(RX_RING + 16 * i, struct.pack("<QQ", RX_BUF + 2 * RX_BUFLEN * i, 0))
    snapshot(drv.ram)
    drv.wr(r.RDT0, 15)
    frames = [eth_frame(bytes([i]) * 60, dst=VF_MAC) for i in range(3)]
    inject(ns_server, *frames)
    deadline = time.monotonic() + 5
    while drv.rd(r.RDH0) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert drv.rd(r.RDH0) == 3
    # The first two descriptors got error write-backs (DD|EOP|RXE, length 0), the
    # third frame landed in buffer 2.
    for slot in (0, 1):
        status, length = struct.unpack_from("<IH", drv.ram.read(RX_RING + 16 * slot + 8, 6))
        assert status & 0x80000003 == 0x80000003 and length == 0
    assert drv.ram.read(RX_BUF + 2 * RX_BUFLEN * 2, len(frames[2])) == frames[2]
    assert drops(ns_server).get("rx_bad_buffer") == 2
    allowed = [(RX_RING, RX_RING + 48),
               (RX_BUF + 4 * RX_BUFLEN, RX_BUF + 4 * RX_BUFLEN + len(frames[2]))]
    assert changed_ranges(drv.ram, allowed) == []
    # Longer than SET_LPE (default 1522): dropped, never written past the buffer.
    inject(ns_server, eth_frame(b"L" * 1600, dst=VF_MAC))
    time.sleep(0.3)
    assert drops(ns_server).get("rx_oversize", 0) == 1
    assert drv.rd(r.RDH0) == 3
    buffer3 = (RX_BUF + 6 * RX_BUFLEN, RX_BUF + 7 * RX_BUFLEN)  # a truncated copy may land
    assert changed_ranges(drv.ram, [*allowed, buffer3]) == []
    still_serving(ns_server, drv)


def test_tx_interrupts_follow_auto_mask(ns_server: NsServer, drv: Driver) -> None:
    """Two doorbells before the re-arm: one message; the EIMS write sends the second."""
    drv.tx_ring()
    frame = eth_frame(b"i" * 46)
    drv.put(TX_BUF, frame)
    for i in range(2):
        drv.tx_desc(i, TX_BUF, len(frame), TXD_CMD_EOP | TXD_CMD_RS)
    drv.doorbell(1)
    drv.doorbell(2)
    assert ns_server.nic()["irq.sent.0"] == 1
    drv.wr(r.EIMS, 0x1)
    drv.c.read32(CONFIG, 0)
    assert ns_server.nic()["irq.sent.0"] == 2
    # A disabled queue ignores its doorbell entirely.
    drv.wr(r.TXDCTL0, 0)
    drv.tx_desc(2, TX_BUF, len(frame), TXD_CMD_EOP | TXD_CMD_RS)
    drv.doorbell(3)
    assert drv.rd(r.TDH0) == 2
