"""Smoke tests of the guest lab itself: boot, script delivery, network peer."""

from __future__ import annotations

import os
import re

import pytest
from vmsilab.config import LabConfig
from vmsilab.fsguard import mounts_under
from vmsilab.guest import NO_NIC, Guest, tap_nic
from vmsilab.iperf import iperf_json, marker_rc, ping_iperf_script, summarize
from vmsilab.mounts import live_holders
from vmsilab.netns import NetNs, list_netns


@pytest.mark.guest
def test_script_delivery_and_exit_code(lab: LabConfig) -> None:
    """A script with quotes and expansions reaches the guest intact; its rc comes back."""
    script = """echo "quoted 'text' $((6 * 7))"
cat /proc/cmdline
exit 3
"""
    with Guest(lab, name="script", nic=NO_NIC) as g:
        res = g.run_script(script, timeout=60)
    assert res.rc == 3
    assert "quoted 'text' 42" in res.output
    assert "lab_ip=10.0.0.2/24" in res.output
    if res.accel == "tcg":
        assert res.stats_before is None, "TCG has no stats provider: must read as None"


@pytest.mark.guest
def test_e1000e_ping_and_iperf3(lab: LabConfig, netns: NetNs) -> None:
    """QEMU's e1000e on a tap in a private netns: lspci sees it, ping and iperf3 work."""
    script = "lspci -n\n" + ping_iperf_script(netns.peer_ip, seconds=3)
    with Guest(lab, netns=netns, name="smoke", nic=tap_nic("tap0", "e1000e")) as g:
        res = g.run_script(script, timeout=120)
    assert res.rc == 0, res.output
    assert "8086:10d3" in res.output, "e1000e (82574L) not on the guest's PCI bus"
    assert marker_rc(res.output, "PING_RC") == 0, res.output
    assert re.search(rf"bytes from {re.escape(netns.peer_ip)}", res.output)
    assert marker_rc(res.output, "IPERF_RC") == 0, res.output
    summary = summarize(iperf_json(res.output))
    print(f"\ne1000e ({res.accel}, boot {res.boot_seconds:.1f} s): {summary}")
    assert summary.received_bps > 0
    assert summary.sent_bps > 0


@pytest.mark.guest
def test_no_leftovers(lab: LabConfig) -> None:
    """After the guests above: no chroot mounts, no netns of this process.

    Another live process using the lab (a second test run, the main job) may
    hold the mounts legitimately; then this process must at least not be one
    of their holders.
    """
    holders = live_holders(lab)
    assert os.getpid() not in holders
    if not holders:
        assert mounts_under(lab.paths.rootfs) == []
    mine = [n for n in list_netns() if n.startswith(f"vmsi-{os.getpid()}-")]
    assert mine == []
