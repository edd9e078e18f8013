"""Issue 4, "Real guest": a stock igbvf guest's MSI-X traffic, as the server sees it.

The guest runs iperf3 (guest -> peer) twice: quiet, then while a shell loop moves
the igbvf vectors (eth0-tx-0, eth0-rx-0, eth0) between its two vCPUs through
/proc/irq/N/smp_affinity. Each move rewrites a vector's address/data with the
entry masked; QEMU emulates the table and tells the server only what
msix-in-qemu.md §1 lists: SET_IRQS eventfd swaps (under TCG one per unmask, none
per mask), PBA reads and Message Control config writes. This runs under `shadow`
and `forward-all` and checks what each counted and which path served it.
"""

from __future__ import annotations

import pytest
from vmsilab.accel import detect_accel
from vmsilab.config import LabConfig
from vmsilab.mainjob import JobOptions, PolicyRun, run_policy
from vmsilab.measure import Row, ServerDelta, cpu_delta, lifetime_checks, make_row
from vmsilab.report import text_table
from vmsilab.workload import phases

SECONDS = 5
BOOT_SET_IRQS = 5  # what a boot alone sends: enable sequence (4) + disable (1)


def _rows(pr: PolicyRun) -> dict[bool, Row]:
    out = {}
    for r in pr.results:
        b, e = pr.marks[(0, r.phase.name, "begin")], pr.marks[(0, r.phase.name, "end")]
        out[r.phase.storm] = make_row([r], cpu_delta(b.server, e.server), mmio_traced=False)
    return out


@pytest.mark.guest
def test_affinity_storm_set_irqs_and_paths(lab: LabConfig) -> None:
    accel = detect_accel()
    opts = JobOptions(duration=SECONDS, trace="narrow", build=False)
    phase_list = phases(("tx",), (False, True))
    runs = {p: run_policy(lab, opts, p, accel, phase_list) for p in ("shadow", "forward-all")}
    rows = {p: _rows(pr) for p, pr in runs.items()}
    life: dict[str, ServerDelta] = {p: pr.lifetime[0][2] for p, pr in runs.items()}
    print("\n" + text_table([rows[p][s] for p in runs for s in (False, True)]))
    for p, d in life.items():
        print(f"{p} lifetime: SET_IRQS {d.count('DEVICE_SET_IRQS')}, "
              f"PBA reads {d.msix_count('msix-pba', 'read')}, "
              f"Message Control writes {d.msix_count('msix-config', 'message-control')}, "
              f"msix events by path {sorted((k, v['count']) for k, v in d.msix.items())}")

    for policy, pr in runs.items():
        quiet, storm = rows[policy][False], rows[policy][True]
        assert pr.guest_rc == [0], (policy, pr.guest_rc)
        for row in (quiet, storm):
            assert isinstance(row.metrics["mbps"], float) and row.metrics["mbps"] > 0, row.metrics
        moves = storm.metrics["moves"]
        assert isinstance(moves, int) and moves > 0, "the storm moved no vector"
        # The churn is what makes SET_IRQS: more than a whole boot sends, and more
        # than the quiet run of the same guest (which sends none).
        set_irqs = storm.metrics["s.set_irqs"]
        assert isinstance(set_irqs, int)
        assert set_irqs > BOOT_SET_IRQS, storm.metrics
        assert set_irqs > quiet.metrics["s.set_irqs"], (quiet.metrics, storm.metrics)
        assert storm.metrics["s.set_irqs_mean_us"] not in (None, "—")
        assert storm.server.msix_count("msix-irqs", "eventfd-swap") > 0
        if accel.name == "tcg":
            # One SET_IRQS per unmask, none per mask (msix-in-qemu.md §4): the
            # server's count follows QEMU's vector_use events, not use + release.
            use, rel = storm.metrics["q.use"], storm.metrics["q.release"]
            assert isinstance(use, int) and isinstance(rel, int) and rel > 0
            assert abs(set_irqs - use) <= 2, (set_irqs, use, rel)
        # Every message QEMU says it sent, the server counted (whole QEMU lifetime).
        totals = pr.lifetime[0][1]
        for check in lifetime_checks(policy, totals, life[policy], mmio_traced=False):
            assert check.ok is not False, check.line()
        # Message Control: enable with function mask set, then function mask clear.
        assert life[policy].msix_count("msix-config", "message-control") >= 2

    # Which path served them: forward-all round-trips every SET_IRQS and Message
    # Control write through the slow path; shadow serves everything fast.
    fa, sh = life["forward-all"], life["shadow"]
    swaps_fa = rows["forward-all"][True].server
    assert swaps_fa.msix_count("msix-irqs", "eventfd-swap", "write-through") > 0
    assert swaps_fa.msix_count("msix-irqs", "eventfd-swap", "fast") == 0
    assert fa.msix_count("msix-config", "message-control", "write-through") >= 2
    assert fa.msix_by_path()[1] > 0 and fa.msix_by_path()[0] == 0
    assert sh.msix_by_path()[1] == 0 and sh.msix_by_path()[0] > 0
    assert rows["shadow"][True].server.msix_count("msix-irqs", "eventfd-swap", "fast") > 0

    # The cost lands in the slow-path process under forward-all only.
    cpu_fa = rows["forward-all"][True].metrics["s.slow_cpu_ms"]
    cpu_sh = rows["shadow"][True].metrics["s.slow_cpu_ms"]
    assert isinstance(cpu_fa, float) and isinstance(cpu_sh, float)
    assert cpu_fa > cpu_sh, (cpu_fa, cpu_sh)
    rt = rows["forward-all"][True].server.slow_round_trips
    assert rt is not None and rt >= rows["forward-all"][True].server.msix_by_path()[1]
