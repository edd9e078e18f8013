"""Ready-made guest runs shared by the CLI and the tests."""

from __future__ import annotations

from dataclasses import dataclass

from .config import LabConfig
from .guest import Guest, ScriptResult, tap_nic
from .iperf import IperfSummary, iperf_json, marker_rc, ping_iperf_script, summarize
from .netns import NetNs


@dataclass(frozen=True)
class NicRun:
    """A guest run with QEMU's own NIC against the netns peer."""

    result: ScriptResult
    ping_rc: int | None
    iperf_rc: int | None
    iperf: IperfSummary | None


def qemu_nic_iperf(
    cfg: LabConfig, *, model: str = "e1000e", seconds: int = 5, reverse: bool = False
) -> NicRun:
    """Boot with ``model`` on a tap in a private netns, ping and iperf3 the peer."""
    with (
        NetNs(cfg, tap="tap0", iperf3_server=True) as ns,
        Guest(cfg, netns=ns, name=model, nic=tap_nic("tap0", model)) as guest,
    ):
        script = ping_iperf_script(ns.peer_ip, seconds, reverse=reverse)
        res = guest.run_script(script, timeout=seconds + 90)
    try:
        summary: IperfSummary | None = summarize(iperf_json(res.output))
    except (ValueError, KeyError):
        summary = None
    return NicRun(res, marker_rc(res.output, "PING_RC"), marker_rc(res.output, "IPERF_RC"), summary)
