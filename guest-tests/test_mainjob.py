"""Issue 5, the main job: a short real run in CI, plus unit tests of its parts.

The guest test runs ``python -m vmsilab.mainjob --quick`` as a user would and
checks the report it wrote: every cell filled or marked not measured, throughput
above zero, and every layer that counts the same thing agreeing (QEMU's trace of
what it sent vs what the server counted). The unit tests need neither root nor
QEMU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vmsilab.config import LabConfig
from vmsilab.mainjob import POLICIES, build_parser, options_from_args
from vmsilab.measure import NA, Check, PhaseResult, ServerDelta, make_row, server_delta
from vmsilab.report import COLUMNS, NOT_MEASURED, cell, markdown_table, text_table
from vmsilab.tracecount import TraceCounts, classify, split_line
from vmsilab.workload import Phase, guest_script, parse_interrupts, parse_phase, phases

GUEST_TESTS = Path(__file__).resolve().parent
REPO = GUEST_TESTS.parent
KVM_COLUMNS = {c.header for c in COLUMNS if c.layer == "KVM"}


# --- the real thing --------------------------------------------------------------------


@pytest.mark.guest
def test_quick_main_job_report_is_complete_and_consistent(lab: LabConfig, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(GUEST_TESTS), str(REPO), env.get("PYTHONPATH", "")])
    cp = subprocess.run(
        [sys.executable, "-m", "vmsilab.mainjob", "--quick", "--no-build", "--out", str(tmp_path)],
        cwd=GUEST_TESTS, env=env, capture_output=True, text=True, timeout=900,
    )
    print(cp.stdout)
    print(cp.stderr[-3000:], file=sys.stderr)
    assert cp.returncode == 0, cp.stderr[-3000:]
    for name in ("latest.md", "latest.json", "latest.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(list(tmp_path.glob("mainjob-*.md"))) == 1
    doc: dict[str, Any] = json.loads((tmp_path / "latest.json").read_text())
    md = (tmp_path / "latest.md").read_text()

    # Two policies x (quiet, storm), guest -> peer.
    rows = doc["rows"]
    assert [(r["policy"], r["phase"]) for r in rows] == [
        ("shadow", "tx"), ("shadow", "tx-storm"),
        ("forward-all", "tx"), ("forward-all", "tx-storm"),
    ]
    tcg = doc["info"]["accel"] == "tcg"
    for r in rows:
        m = r["metrics"]
        assert m["mbps"] > 0, r
        for key, value in m.items():
            # Not measured is None (n/m), never a made-up 0; KVM figures exist
            # exactly when the guest ran under KVM with a stats provider.
            if key.startswith("kvm."):
                assert (value is None) == (not doc["kvm_schema"]), (key, value)
            elif key in ("s.set_irqs_mean_us", "s.set_irqs_p99_us") and m["s.set_irqs"] == 0:
                assert value == NA
            elif key == "moves":
                assert (value == NA) == (not r["phase"].endswith("storm"))
            else:
                assert value is not None, (r["policy"], r["phase"], key)
        if r["phase"].endswith("storm"):
            assert m["moves"] > 0 and m["s.set_irqs"] > 5
        # Same window, two layers: what QEMU traced as sent, the server served.
        assert abs(m["q.set_irqs"] - m["s.set_irqs"]) <= 2, m
        if tcg:
            assert abs(m["q.use"] - m["s.set_irqs"]) <= 2, m
    by = {(r["policy"], r["phase"]): r["metrics"] for r in rows}
    assert by[("forward-all", "tx-storm")]["s.slow"] > 0
    assert by[("shadow", "tx-storm")]["s.slow"] == 0
    assert by[("forward-all", "tx-storm")]["s.slow_cpu_ms"] > by[("shadow", "tx-storm")][
        "s.slow_cpu_ms"]

    # Consistency: every strict check measured and held; one line per check printed.
    strict = [c for c in doc["checks"] if c["strict"]]
    assert len(strict) >= 2 * 8
    assert all(c["ok"] is True for c in strict), [c["line"] for c in strict if not c["ok"]]
    assert cp.stdout.count("consistency ") == len(doc["checks"])
    set_irqs = [c for c in strict if c["what"] == "SET_IRQS messages"]
    assert len(set_irqs) == 2 and all(c["left"] == c["right"] > 0 for c in set_irqs)

    # The table: every cell filled; n/m only where a layer did not measure.
    table_lines = [ln for ln in md.splitlines() if ln.startswith("| shadow") or
                   ln.startswith("| forward-all")]
    assert len(table_lines) == 4
    headers = [h.strip() for h in md.split("## Comparison")[1].split("\n")[2].split("|")[1:-1]]
    for line in table_lines:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert len(cells) == len(headers) and all(cells), line
        for h, c in zip(headers, cells, strict=True):
            if c == NOT_MEASURED:
                assert h.split(" (")[0] in KVM_COLUMNS, (h, line)
    assert "## Consistency between layers" in md and "FAIL" not in md


# --- units -----------------------------------------------------------------------------


def test_trace_line_split_and_classify() -> None:
    ts, ev, rest = split_line("2026-11-29T01:08:52.235535Z memory_region_ops_read cpu 0 mr 0x1 "
                              "addr 0xfe00400c value 0x1 size 4 name 'msix-table'")
    assert ev == "memory_region_ops_read" and ts is not None
    assert abs(ts - 1795914532.235535) < 1e-6
    assert classify(ev, rest) == ["mmio.msix-table.read"]
    assert split_line("1234@1700000000.000100:vfio_user_set_irqs  index 2")[:2] == (
        1700000000.0001, "vfio_user_set_irqs")
    assert split_line("vfio_user_set_irqs  index 2 start 0")[0] is None
    assert classify("memory_region_ops_write",
                    "cpu 1 mr 0x2 addr 0x0 value 0x1 size 4 name 'VFIO MSIX PBA'") == [
        "mmio.vfio-pba.write"]
    assert classify("memory_region_ops_write", "... name 'vfio-user:/lab/x.sock BAR 0'") == [
        "mmio.vfio-bar.write"]
    assert classify("memory_region_ops_read", "... name 'hpet'") == ["mmio.other"]
    assert classify("vfio_user_region_rw", " region 7 offset 0x72 count 2") == [
        "vfio_user.region_rw", "vfio_user.region_rw.config"]
    assert classify("vfio_user_region_rw", " region 0 offset 0x3818 count 4") == [
        "vfio_user.region_rw"]
    assert classify("vfio_pci_write_config", " (0000:00:03.0, @0x72, 0xc003, len=0x2)") == [
        "pci.write_config", "pci.write_config.msix"]
    assert classify("vfio_pci_write_config", " (0000:00:03.0, @0x4, 0x6, len=0x2)") == [
        "pci.write_config"]
    assert classify("vfio_user_wrmulti", " flush count 0x10") == ["vfio_user.wrmulti_flush"]
    assert classify("vfio_msix_vector_do_use", " (dev) vector 1 used") == ["msix.vector_use"]


def test_trace_counts_window_by_line_time() -> None:
    c = TraceCounts()
    c.feed([
        "1970-01-01T00:00:10.000000Z vfio_user_set_irqs  index 2 start 0 count 1 flags 0x24\n",
        "1970-01-01T00:00:11.000000Z vfio_user_set_irqs  index 2 start 1 count 1 flags 0x24\n",
        "1970-01-01T00:00:11.500000Z vfio_msix_vector_do_use (x) vector 1 used\n",
        "1970-01-01T00:00:13.000000Z vfio_user_set_irqs  index 2 start 2 count 1 flags 0x24\n",
        "garbage without a stamp\n",
    ])
    assert c.lines == 5 and c.untimed == 1
    assert c.window(10.5, 12.0) == {"vfio_user.set_irqs": 1, "msix.vector_use": 1}
    assert c.total()["vfio_user.set_irqs"] == 3


def test_workload_script_and_parsing() -> None:
    ph = phases(("tx", "rx"), (False, True))
    assert [p.name for p in ph] == ["tx", "rx", "tx-storm", "rx-storm"]
    script = guest_script(ph, peer="10.0.0.1", port=5202, seconds=3, vcpus=4)
    assert "for c in 1 2 4 8; do" in script
    assert "phase rx-storm 1 -R" in script and "phase tx 0 ''" in script
    assert "-p 5202 -t 3" in script
    with pytest.raises(ValueError):
        Phase("up", False)
    irq = (" 24:        997        798   PCI-MSI 32768-edge      eth0-tx-0\n"
           " 25:        591        508   PCI-MSI 32769-edge      eth0-rx-0\n")
    assert parse_interrupts(irq) == {"eth0-tx-0": 1795, "eth0-rx-0": 1099}
    iperf = {"end": {"sum_sent": {"bits_per_second": 2e8, "retransmits": 0},
                     "sum_received": {"bits_per_second": 1.9e8, "seconds": 3.0}}}
    out = ("PHASE_END tx-storm\nPHASE_DATA_BEGIN tx-storm\nIRQ_BEFORE\n"
           " 24:  1  1  PCI-MSI 1-edge  eth0-tx-0\nIRQ_AFTER\n"
           " 24:  5  7  PCI-MSI 1-edge  eth0-tx-0\nIRQ_DONE\nMOVES=12\nIPERF_RC=0\n"
           f"IPERF_JSON_BEGIN\n{json.dumps(iperf)}\n\nIPERF_JSON_END\nPHASE_DATA_END tx-storm\n")
    d = parse_phase(out, "tx-storm")
    assert d.irqs == {"eth0-tx-0": 10} and d.moves == 12 and d.iperf_rc == 0
    assert d.iperf is not None and d.iperf.received_bps == 1.9e8


def _snap(set_irqs: int, total_ns: int, swaps: int, path: str, cpu: float) -> dict[str, Any]:
    return {
        "cpu": {"io_process_seconds": cpu, "slowpath_seconds": 0.0,
                "io_process_exec_seconds": cpu, "slowpath_exec_seconds": cpu / 2},
        "slowpath": {"pid": 7, "restarts": 0, "counters": {"accesses": []}},
        "devices": {"vf0": {
            "messages": {"DEVICE_SET_IRQS": {"count": set_irqs, "errors": 0,
                                             "total_ns": total_ns,
                                             "log2_buckets": {"17": set_irqs}}},
            "eventfd_swaps": swaps,
            "msix": {"accesses": [{"region": "msix-irqs", "kind": "eventfd-swap", "path": path,
                                   "count": swaps, "latency": {"count": swaps,
                                                               "total_ns": 10 * swaps}}],
                     "counters": {}},
            "nic": {},
        }},
    }


def test_server_delta_and_row_cells() -> None:
    a = _snap(5, 500_000, 4, "write-through", 1.0)
    b = _snap(105, 20_500_000, 104, "write-through", 1.5)
    d = server_delta(a, b, "vf0")
    assert d.count("DEVICE_SET_IRQS") == 100 and d.mean_us("DEVICE_SET_IRQS") == 200.0
    assert d.p99_us("DEVICE_SET_IRQS") == (1 << 18) / 1000
    assert d.msix_by_path() == (0, 100) and d.eventfd_swaps == 100
    assert d.io_cpu_s == 0.5 and d.slow_cpu_s == 0.25
    from vmsilab.workload import GuestPhaseData

    g = GuestPhaseData(irqs={"eth0-tx-0": 3}, moves=None, iperf_rc=0, iperf=None,
                       iperf_error="x")
    quiet = PhaseResult("shadow", 0, Phase("tx", False), 0.0, 1.0, g, ServerDelta(), None, None)
    row = make_row([quiet], (0.1, 0.0), mmio_traced=True)
    cells = {c.header: cell(row, c) for c in COLUMNS}
    assert cells["Mbit/s"] == NOT_MEASURED  # iperf3 failed: not a zero
    assert cells["moves"] == NA and cells["SI us mean/p99"] == NA
    assert cells["exits"] == NOT_MEASURED and cells["tbl r/w"] == NOT_MEASURED
    assert cells["SET_IRQS"] == "0" and cells["slow ms"] == "0"
    assert "| shadow | tx |" in markdown_table([row])
    assert text_table([row]).splitlines()[0].strip().startswith("guest")


def test_check_relations() -> None:
    assert Check("s", "w", "a", 3, "==", "b", 3).ok is True
    assert Check("s", "w", "a", 3, "==", "b", 4).ok is False
    assert Check("s", "w", "a", None, "==", "b", 4).ok is None
    assert "n/m" in Check("s", "w", "a", None, "==", "b", 4).line()
    assert Check("s", "w", "a", 3, "<=", "b", 4).ok is True
    assert Check("s", "w", "a", 100, "~", "b", 104, tolerance=0.05).ok is True
    assert Check("s", "w", "a", 100, "~", "b", 120, tolerance=0.05, strict=False).ok is False
    assert "WARN" in Check("s", "w", "a", 100, "~", "b", 120, strict=False).line()


def test_cli_options() -> None:
    p = build_parser()
    q = options_from_args(p.parse_args(["--quick"]))
    assert q.duration == 3 and q.policies == ("shadow", "forward-all") and q.directions == ("tx",)
    full = options_from_args(p.parse_args([]))
    assert full.policies == POLICIES and full.directions == ("tx", "rx") and full.duration == 8
    assert full.storms == (False, True)
    o = options_from_args(p.parse_args(["--quick", "--duration", "5", "--policies", "legacy",
                                        "--storm-only", "--vfs", "2", "--accel", "tcg"]))
    assert (o.duration, o.policies, o.storms, o.vfs, o.accel) == (5, ("legacy",), (True,), 2,
                                                                   "tcg")
    with pytest.raises(SystemExit):
        p.parse_args(["--no-storm", "--storm-only"])
    with pytest.raises(SystemExit):
        p.parse_args(["--policies", "shadow,bogus"])
    help_text = p.format_help()
    for flag in ("--vcpus", "--memory", "--duration", "--policies", "--accel", "--vfs",
                 "--no-storm", "--storm-only", "--out", "--quick", "--trace"):
        assert flag in help_text
