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


def marker_rc(output: str, name: str) -> int | None:
    """Value of a ``NAME=<int>`` line, or None if the line is missing."""
    m = re.search(rf"^{name}=(\d+)\s*$", output, re.M)
    return int(m.group(1)) if m else None


def iperf_json(output: str) -> dict[str, Any]:
    """The iperf3 -J document printed between the marker lines."""
    m = re.search(rf"^{JSON_BEGIN}\s*$(.*?)^{JSON_END}\s*$", output, re.M | re.S)
    if not m:
        raise ValueError("no iperf3 JSON block in guest output")
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
