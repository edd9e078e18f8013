"""Two igbvf guests on two VFs of one PF, switched by a Linux bridge over the taps.

``vmsi-server --vfs 2`` opens tap0 and tap1 in the lab netns; the test bridges
them (the commands of docs/multi-vf.md) with the peer address on br0. Guest A
(10.0.0.2, VF0) and guest B (10.0.0.3, VF1) boot side by side: each must see
its own, distinct MAC, ping the bridge and the other guest, and A runs iperf3
to an iperf3 server in B, so the data crosses VF0 -> tap0 -> br0 -> tap1 -> VF1.
"""

from __future__ import annotations

import time

import pytest
from vmsilab.config import LabConfig
from vmsilab.guest import CMD_RE, NO_NIC, POWEROFF_RE, RC_RE, Guest
from vmsilab.iperf import (
    iperf_json,
    iperf_run_script,
    link_wait_script,
    marker_rc,
    marker_value,
    summarize,
)
from vmsilab.netns import NetNs
from vmsilab.vfserver import VfServer

BRIDGE = [
    ["ip", "link", "add", "br0", "type", "bridge"],
    ["ip", "link", "set", "tap0", "master", "br0"],
    ["ip", "link", "set", "tap1", "master", "br0"],
    ["ip", "addr", "add", "10.0.0.1/24", "dev", "br0"],
    ["ip", "link", "set", "br0", "up"],
]
A_IP, B_IP = "10.0.0.2", "10.0.0.3"


def until_ping(target: str, name: str, tries: int = 90) -> str:
    return (f"i=0; until ping -c 1 -W 1 {target} >/dev/null 2>&1; do i=$((i + 1)); "
            f"[ $i -ge {tries} ] && break; done; "
            f"ping -c 2 -W 2 {target}; echo {name}=$?\n")


def script_a() -> str:
    s = link_wait_script("eth0", f"{A_IP}/24")
    s += "ping -c 2 -W 2 10.0.0.1; echo PING_BRIDGE_RC=$?\n"
    s += until_ping(B_IP, "PING_OTHER_RC")
    # B's iperf3 server may still be starting: retry the connect a few times.
    s += ("j=0; until iperf3 -c 10.0.0.3 -t 1 >/dev/null 2>&1; do j=$((j + 1)); "
          "[ $j -ge 20 ] && break; sleep 1; done\n")
    s += iperf_run_script(B_IP, 5, tag="VF2VF")
    return s


def script_b() -> str:
    s = link_wait_script("eth0", f"{B_IP}/24")
    s += "iperf3 -s -D --logfile /tmp/iperf3-s.log\n"
    s += "ping -c 2 -W 2 10.0.0.1; echo PING_BRIDGE_RC=$?\n"
    s += until_ping(A_IP, "PING_OTHER_RC")
    # Stay up until A's two iperf3 runs against us (probe + measured) have finished.
    s += ("k=0; n=0; while [ $k -lt 150 ]; do "
          "n=$(grep -c receiver /tmp/iperf3-s.log 2>/dev/null); "
          "[ \"${n:-0}\" -ge 2 ] && break; sleep 1; k=$((k + 1)); done; echo B_SERVED=$n\n")
    return s


def finish(guest: Guest, timeout: float) -> tuple[int, str]:
    """Wait for the script's exit code; return it and the script's output."""
    guest.wait_for(CMD_RE, 60)
    start = guest.cursor
    m = guest.wait_for(RC_RE, timeout)
    out = guest.text(start, m.start())
    guest.wait_for(POWEROFF_RE, 30)
    return int(m.group(1)), out


@pytest.mark.guest
def test_two_guests_two_vfs_through_a_bridge(lab: LabConfig, bare_netns: NetNs) -> None:
    ns = bare_netns
    with VfServer(lab, ns, vfs=2, configure_taps=False) as server:
        for cmd in BRIDGE:
            ns.exec(cmd)
        with (Guest(lab, netns=ns, name="vfA", nic=NO_NIC, smp=1, lab_ip=f"{A_IP}/24",
                    devices=[server.device_arg(0)]) as a,
              Guest(lab, netns=ns, name="vfB", nic=NO_NIC, smp=1, lab_ip=f"{B_IP}/24",
                    devices=[server.device_arg(1)]) as b):
            b.boot(script=script_b())
            time.sleep(0.5)
            a.boot(script=script_a())
            a.wait_ready()
            b.wait_ready()
            rc_a, out_a = finish(a, 240)
            rc_b, out_b = finish(b, 150)
        devices = server.counters()["devices"]
        fdb = ns.exec(["bridge", "fdb", "show", "br", "br0"]).stdout
        assert server.stop() == 0, server.log()[-3000:]

    macs = [devices[f"vf{i}"]["mac"] for i in range(2)]
    assert macs[0] != macs[1]
    assert marker_value(out_a, "LINK_MAC") == macs[0], out_a
    assert marker_value(out_b, "LINK_MAC") == macs[1], out_b
    for out in (out_a, out_b):
        assert marker_value(out, "LINK_DRIVER") == "igbvf", out
        assert marker_value(out, "LINK_CARRIER") == "1", out
        assert marker_rc(out, "PING_BRIDGE_RC") == 0, out
        assert marker_rc(out, "PING_OTHER_RC") == 0, out
    assert rc_a == 0 and rc_b == 0
    assert macs[0] in fdb and macs[1] in fdb, fdb
    summary = summarize(iperf_json(out_a, "VF2VF"))
    print(f"\nVF0 guest -> VF1 guest through br0: {summary}")
    assert summary.received_bps > 0
    n0, n1 = devices["vf0"]["nic"], devices["vf1"]["nic"]
    assert n0["gptc"] > 1000 and n1["gprc"] > 1000, (n0, n1)
