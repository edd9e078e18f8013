"""Guest-side network checks and the parsing of their output.

The guest script prints machine-readable lines (``PING_RC=``, ``IPERF_RC=``) and
``iperf3 -J`` JSON between two marker lines, so the host never has to scrape
human-formatted tables from a serial console.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

JSON_BEGIN = "IPERF_JSON_BEGIN"
JSON_END = "IPERF_JSON_END"


def ping_iperf_script(
    peer: str, seconds: int, *, reverse: bool = False, settle: float = 1.0
) -> str:
    """Guest script: wait for carrier, ping the peer, run iperf3 -J against it."""
    rev = " -R" if reverse else ""
    return (
        f"sleep {settle}\n"
        f"ping -c 3 -W 2 {peer}; echo PING_RC=$?\n"
        f"iperf3 -c {peer} -t {seconds}{rev} -J > /tmp/iperf3.json; echo IPERF_RC=$?\n"
        f"echo {JSON_BEGIN}; cat /tmp/iperf3.json; echo; echo {JSON_END}\n"
    )


def link_wait_script(iface: str = "eth0", address: str = "10.0.0.2/24",
                     timeout_s: int = 20) -> str:
    """Guest script: wait for ``iface`` to exist, bring it up with ``address`` and wait
    for carrier. /init waits only 1 s for eth0 and may already have assigned the
    address ("File exists" is fine). Prints ``LINK_MAC=``, ``LINK_CARRIER=``,
    ``LINK_DRIVER=`` and ``LINK_WAIT_DS=`` (tenths of a second waited for carrier)."""
    ticks = timeout_s * 10
    return (
        f"i=0; while [ ! -e /sys/class/net/{iface} ] && [ $i -lt {ticks} ]; do "
        f"sleep 0.1; i=$((i + 1)); done\n"
        f"ip link set {iface} up\n"
        f"ip addr add {address} dev {iface} 2>/dev/null || true\n"
        f"i=0; while [ \"$(cat /sys/class/net/{iface}/carrier 2>/dev/null)\" != 1 ] "
        f"&& [ $i -lt {ticks} ]; do sleep 0.1; i=$((i + 1)); done\n"
        f"echo LINK_WAIT_DS=$i\n"
        f"echo LINK_MAC=$(cat /sys/class/net/{iface}/address)\n"
        f"echo LINK_CARRIER=$(cat /sys/class/net/{iface}/carrier 2>/dev/null)\n"
        f"echo LINK_DRIVER=$(basename $(readlink /sys/class/net/{iface}/device/driver))\n"
    )


def iperf_run_script(peer: str, seconds: int, *, reverse: bool = False, tag: str = "FWD",
                     extra: str = "") -> str:
    """Guest script: one ``iperf3 -J`` run whose JSON is printed between tagged markers
    (read it back with ``iperf_json(output, tag)``); ``IPERF_<tag>_RC=`` is its rc."""
    rev = " -R" if reverse else ""
    out = f"/tmp/iperf3-{tag}.json"
    return (
        f"iperf3 -c {peer} -t {seconds}{rev}{extra} -J > {out}; echo IPERF_{tag}_RC=$?\n"
        f"echo {JSON_BEGIN}_{tag}; cat {out}; echo; echo {JSON_END}_{tag}\n"
    )


def marker_value(output: str, name: str) -> str | None:
    """Value of a ``NAME=<text>`` line, or None if the line is missing."""
    m = re.search(rf"^{name}=(.*?)\s*$", output, re.M)
    return m.group(1) if m else None


def marker_rc(output: str, name: str) -> int | None:
    """Value of a ``NAME=<int>`` line, or None if the line is missing."""
    m = re.search(rf"^{name}=(\d+)\s*$", output, re.M)
    return int(m.group(1)) if m else None


def iperf_json(output: str, tag: str | None = None) -> dict[str, Any]:
    """The iperf3 -J document printed between the marker lines (``_<tag>``-suffixed
    markers for ``iperf_run_script``)."""
    begin, end = (JSON_BEGIN, JSON_END) if tag is None else (f"{JSON_BEGIN}_{tag}",
                                                             f"{JSON_END}_{tag}")
    m = re.search(rf"^{begin}\s*$(.*?)^{end}\s*$", output, re.M | re.S)
    if not m:
        raise ValueError(f"no iperf3 JSON block {tag or ''} in guest output")
    return json.loads(m.group(1))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class IperfSummary:
    """Throughput of one iperf3 run, bits per second."""

    sent_bps: float
    received_bps: float
    seconds: float
    retransmits: int | None

    def __str__(self) -> str:
        return (
            f"{self.received_bps / 1e6:.0f} Mbit/s received, {self.sent_bps / 1e6:.0f} Mbit/s"
            f" sent over {self.seconds:.1f} s (retransmits: {self.retransmits})"
        )


def summarize(doc: dict[str, Any]) -> IperfSummary:
    """Summary from iperf3 -J; raises ValueError when iperf3 reported an error."""
    if "error" in doc:
        raise ValueError(f"iperf3 error: {doc['error']}")
    end = doc["end"]
    sent, recv = end["sum_sent"], end["sum_received"]
    return IperfSummary(
        sent_bps=float(sent["bits_per_second"]),
        received_bps=float(recv["bits_per_second"]),
        seconds=float(recv.get("seconds", sent.get("seconds", 0.0))),
        retransmits=sent.get("retransmits"),
    )
