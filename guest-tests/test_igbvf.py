"""A stock Linux igbvf guest passes ping and iperf3 through the server's VF.

The server runs in a private netns and opens ``tap0`` there; the netns end of the
tap is the peer (10.0.0.1/24, iperf3 -s). One boot per offload setting: the
driver's defaults (TSO, TX/RX checksum, SG on), and everything off through
``ethtool -K``. Each boot runs iperf3 for 10 s in each direction and the
server's counters must show TSO super-frames in the first case and none in the
second.
"""

from __future__ import annotations

import re

import pytest
from vmsilab.config import LabConfig
from vmsilab.guest import NO_NIC, Guest
from vmsilab.iperf import (
    iperf_json,
    iperf_run_script,
    link_wait_script,
    marker_rc,
    marker_value,
    summarize,
)
from vmsilab.netns import GUEST_ADDR, NetNs
from vmsilab.vfserver import VfServer

VF_MAC = "02:76:0a:00:00:10"
SECONDS = 10
OFFLOADS_OFF = "ethtool -K eth0 tso off tx off sg off rx off"


def feature(output: str, name: str) -> str | None:
    """``on``/``off`` of one ``ethtool -k`` line (``tcp-segmentation-offload: on``)."""
    m = re.search(rf"^{re.escape(name)}: (on|off)", output, re.M)
    return m.group(1) if m else None


def guest_script(peer: str, offloads: bool) -> str:
    script = link_wait_script("eth0", GUEST_ADDR)
    script += "dmesg | grep -i -e igbvf -e 'Virtual Function' -e 'Link is'\n"
    if not offloads:
        script += f"{OFFLOADS_OFF}; echo ETHTOOL_K_RC=$?\n"
    script += "ethtool -k eth0\n"
    script += f"ping -c 3 -W 2 {peer}; echo PING_RC=$?\n"
    script += iperf_run_script(peer, SECONDS, tag="FWD")
    script += iperf_run_script(peer, SECONDS, reverse=True, tag="REV")
    script += "ifconfig eth0\n"
    return script


@pytest.mark.guest
@pytest.mark.parametrize("offloads", [True, False], ids=["offloads-on", "offloads-off"])
def test_igbvf_ping_and_iperf3_both_directions(
    lab: LabConfig, bare_netns: NetNs, offloads: bool
) -> None:
    ns = bare_netns
    with VfServer(lab, ns, extra_args=["--mac", VF_MAC]) as server:
        ns.start_iperf3()
        with Guest(lab, netns=ns, name="igbvf", nic=NO_NIC,
                   devices=[server.device_arg(0)]) as guest:
            res = guest.run_script(guest_script(ns.peer_ip, offloads),
                                   timeout=2 * SECONDS + 120)
        counters = server.counters()
        assert server.stop() == 0, server.log()[-3000:]
    out = res.output
    assert res.rc == 0, out

    # Bound, addressed as the server says, link up at the speed STATUS reports.
    assert marker_value(out, "LINK_DRIVER") == "igbvf", out
    assert "Intel(R) 82576 Virtual Function" in out, out
    assert "Link is Up 1000 Mbps Full Duplex" in out, out
    assert marker_value(out, "LINK_CARRIER") == "1", out
    dev = counters["devices"]["vf0"]
    assert marker_value(out, "LINK_MAC") == VF_MAC == dev["mac"], (out, dev["mac"])

    # Offload settings as requested.
    expect = "on" if offloads else "off"
    if not offloads:
        assert marker_rc(out, "ETHTOOL_K_RC") == 0, out
    for name in ("tcp-segmentation-offload", "tx-checksumming", "scatter-gather",
                 "rx-checksumming"):
        assert feature(out, name) == expect, (name, out)

    assert marker_rc(out, "PING_RC") == 0, out
    fwd = summarize(iperf_json(out, "FWD"))
    rev = summarize(iperf_json(out, "REV"))
    assert marker_rc(out, "IPERF_FWD_RC") == 0 and marker_rc(out, "IPERF_REV_RC") == 0, out
    nic = dev["nic"]
    label = "offloads on" if offloads else "offloads off"
    print(f"\nigbvf ({res.accel}, {label}, boot {res.boot_seconds:.1f} s, "
          f"carrier after {marker_value(out, 'LINK_WAIT_DS')} ds)")
    print(f"  guest->peer: {fwd.received_bps / 1e6:.0f} Mbit/s, "
          f"retransmits {fwd.retransmits}")
    print(f"  peer->guest: {rev.received_bps / 1e6:.0f} Mbit/s, "
          f"retransmits {rev.retransmits}")
    print(f"  server: tso_frames {nic['tx_tso_frames']} (segments {nic['tx_tso_segments']}),"
          f" csum_frames {nic['tx_csum_frames']}, gptc {nic['gptc']}, gprc {nic['gprc']},"
          f" drops {({k: v for k, v in nic.items() if k.startswith('drop.')})}")
    assert fwd.received_bps > 0 and rev.received_bps > 0

    # TSO super-frames travelled only when the driver was allowed to build them.
    if offloads:
        assert nic["tx_tso_frames"] > 0, nic
        assert nic["tx_tso_segments"] > nic["tx_tso_frames"], nic
    else:
        assert nic["tx_tso_frames"] == 0, nic
        assert nic["tx_csum_frames"] == 0, nic
    assert nic["gptc"] > 0 and nic["gprc"] > 0
