"""The guest side of a measurement: iperf3 phases, optionally with an affinity storm.

One boot runs a list of phases. Each phase is one iperf3 run against the netns
peer, guest->peer (``tx``) or peer->guest (``rx``, ``iperf3 -R``), and with
``storm`` a background loop moves the igbvf vectors (``eth0-tx-0``,
``eth0-rx-0`` and the ``eth0`` mailbox vector, found in /proc/interrupts)
between vCPUs by writing ``/proc/irq/N/smp_affinity``. Each move rewrites the
vector's MSI-X address/data with the entry masked, so stock QEMU sends the server
one SET_IRQS on the unmask (two under KVM: msix-in-qemu.md §4).

The guest brackets each phase with console markers the host waits for::

    PHASE_BEGIN <name>      host snapshots every layer, guest waits ``settle`` s
    ... iperf3 (and the storm) ...
    PHASE_END <name>        host snapshots again
    PHASE_DATA_BEGIN <name> /proc/interrupts before/after, moves, iperf3 -J
    PHASE_DATA_END <name>   (printed after PHASE_END: outside the window)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .iperf import IperfSummary, iperf_json, summarize

DIRECTIONS = ("tx", "rx")
BEGIN_RE = r"PHASE_BEGIN {name}\n"
END_RE = r"PHASE_END {name}\n"


@dataclass(frozen=True)
class Phase:
    """One iperf3 run: direction ``tx`` (guest->peer) or ``rx`` (peer->guest)."""

    direction: str
    storm: bool

    @property
    def name(self) -> str:
        return self.direction + ("-storm" if self.storm else "")

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {self.direction!r}")


def phases(
    directions: tuple[str, ...] = DIRECTIONS, storms: tuple[bool, ...] = (False, True)
) -> list[Phase]:
    """All no-storm phases first, then the storm ones (a storm leaves nothing behind,
    but the quiet runs should not follow one)."""
    return [Phase(d, s) for s in storms for d in directions]


def cpu_masks(vcpus: int) -> list[str]:
    """Affinity masks the storm cycles through: one vCPU each, as hex."""
    return [f"{1 << k:x}" for k in range(max(1, vcpus))]


def guest_script(
    phase_list: list[Phase],
    *,
    peer: str,
    port: int = 5201,
    seconds: int = 8,
    vcpus: int = 2,
    storm_interval_us: int = 10_000,
    settle: float = 0.5,
    report_interval: float = 0,
) -> str:
    """The /lab-run.sh that runs ``phase_list`` (busybox sh). ``report_interval``:
    iperf3 -i (0: only the totals, the smallest JSON)."""
    masks = " ".join(cpu_masks(vcpus))
    lines = [
        "sleep 1",  # carrier (guest-lab.md §4.4)
        f"ping -c 2 -W 2 {peer} >/dev/null 2>&1; echo PING_RC=$?",
        "IRQS=$(grep eth0 /proc/interrupts | cut -d: -f1 | tr -d ' ')",
        'echo "LAB_IRQS $IRQS"',
        # The storm: every move is one write to smp_affinity; count the ones the
        # kernel accepted. The trap runs when the current usleep returns.
        "churn() {",
        "  n=0",
        "  trap 'echo $n > /tmp/moves; exit 0' TERM",
        "  while :; do",
        f"    for c in {masks}; do",
        "      for i in $IRQS; do",
        "        echo $c > /proc/irq/$i/smp_affinity 2>/dev/null && n=$((n+1))",
        "      done",
        f"      usleep {int(storm_interval_us)}",
        "    done",
        "  done",
        "}",
        "phase() {",
        "  name=$1; storm=$2; rev=$3",
        "  rm -f /tmp/moves /tmp/j /tmp/je",
        '  echo "PHASE_BEGIN $name"',
        f"  sleep {settle}",
        "  grep eth0 /proc/interrupts > /tmp/irq0",
        "  if [ $storm = 1 ]; then churn & CH=$!; fi",
        f"  iperf3 -c {peer} -p {port} -t {int(seconds)} $rev -J -i {report_interval:g}"
        " > /tmp/j 2>/tmp/je; rc=$?",
        "  if [ $storm = 1 ]; then kill $CH; wait $CH; fi",
        "  grep eth0 /proc/interrupts > /tmp/irq1",
        '  echo "PHASE_END $name"',
        '  echo "PHASE_DATA_BEGIN $name"',
        "  echo IRQ_BEFORE; cat /tmp/irq0; echo IRQ_AFTER; cat /tmp/irq1; echo IRQ_DONE",
        '  if [ -f /tmp/moves ]; then echo "MOVES=$(cat /tmp/moves)"; fi',
        "  echo IPERF_RC=$rc; cat /tmp/je",
        "  echo IPERF_JSON_BEGIN; cat /tmp/j; echo; echo IPERF_JSON_END",
        '  echo "PHASE_DATA_END $name"',
        f"  sleep {settle}",
        "}",
    ]
    for p in phase_list:
        rev = "-R" if p.direction == "rx" else "''"
        lines.append(f"phase {p.name} {int(p.storm)} {rev}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class GuestPhaseData:
    """What the guest reported for one phase."""

    irqs: dict[str, int]  # per vector name (eth0-tx-0, ...): interrupts taken, all vCPUs
    moves: int | None  # affinity writes accepted; None: no storm in this phase
    iperf_rc: int | None
    iperf: IperfSummary | None
    iperf_error: str | None

    @property
    def irq_total(self) -> int:
        return sum(self.irqs.values())


def parse_interrupts(text: str) -> dict[str, int]:
    """/proc/interrupts lines -> {name: count summed over CPUs}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        head, sep, tail = line.partition(":")
        if not sep or not head.strip().isdigit():
            continue
        fields = tail.split()
        counts = []
        for f in fields:
            if not f.isdigit():
                break
            counts.append(int(f))
        if fields:
            out[fields[-1]] = out.get(fields[-1], 0) + sum(counts)
    return out


def phase_block(output: str, name: str) -> str:
    m = re.search(
        rf"^PHASE_DATA_BEGIN {re.escape(name)}\n(.*?)^PHASE_DATA_END {re.escape(name)}$",
        output,
        re.M | re.S,
    )
    if not m:
        raise ValueError(f"no data block for phase {name!r} in the guest output")
    return m.group(1)


def parse_phase(output: str, name: str) -> GuestPhaseData:
    block = phase_block(output, name)
    before = block.split("IRQ_BEFORE\n", 1)[1].split("IRQ_AFTER\n", 1)[0]
    after = block.split("IRQ_AFTER\n", 1)[1].split("IRQ_DONE", 1)[0]
    b, a = parse_interrupts(before), parse_interrupts(after)
    irqs = {k: a[k] - b.get(k, 0) for k in a}
    m_moves = re.search(r"^MOVES=(\d+)", block, re.M)
    m_rc = re.search(r"^IPERF_RC=(\d+)", block, re.M)
    iperf: IperfSummary | None = None
    err: str | None = None
    try:
        doc: dict[str, Any] = iperf_json(block)
        iperf = summarize(doc)
    except (ValueError, KeyError) as e:
        err = str(e)
    return GuestPhaseData(
        irqs=irqs,
        moves=int(m_moves.group(1)) if m_moves else None,
        iperf_rc=int(m_rc.group(1)) if m_rc else None,
        iperf=iperf,
        iperf_error=err,
    )
