"""The main job's comparison: one table (text and Markdown), details, a plot, JSON.

Cells that were not measured print ``n/m``; cells that do not apply print ``—``.
A zero is printed only for a counter that was measured and stayed at zero.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .measure import NA, Check, Row, Value

log = logging.getLogger("vmsilab")
NOT_MEASURED = "n/m"


@dataclass(frozen=True)
class Column:
    header: str
    keys: tuple[str, ...]
    layer: str
    legend: str
    decimals: int = 0


COLUMNS: tuple[Column, ...] = (
    Column("Mbit/s", ("mbps",), "guest", "iperf3 throughput at the receiver, summed over VFs"),
    Column("g.IRQ", ("guest_irqs",), "guest", "interrupts the guest took on eth0 vectors"),
    Column("moves", ("moves",), "guest", "affinity writes by the storm (— without storm)"),
    Column("exits", ("kvm.exits",), "KVM", "KVM exits (query-stats, all vCPUs)"),
    Column("mmio.ex", ("kvm.mmio_exits",), "KVM", "KVM MMIO exits to QEMU"),
    Column("irq.ex", ("kvm.irq_exits",), "KVM", "KVM exits for host interrupts"),
    Column("inj", ("kvm.irq_injections",), "KVM", "interrupts KVM injected"),
    Column("tbl r/w", ("q.table_r", "q.table_w"), "QEMU",
           "guest reads/writes of QEMU's emulated MSI-X table (trace memory_region_ops)"),
    Column("PBA r", ("q.pba_r",), "QEMU",
           "guest reads of the PBA overlay (each one a REGION_READ)"),
    Column("use/rel", ("q.use", "q.release"), "QEMU",
           "vfio_msix_vector_do_use / _release (unmask / mask)"),
    Column("q.msi", ("q.msi",), "QEMU", "interrupts QEMU took from the server's eventfds"),
    Column("SET_IRQS", ("s.set_irqs",), "server", "SET_IRQS messages served"),
    Column("SI us mean/p99", ("s.set_irqs_mean_us", "s.set_irqs_p99_us"), "server",
           "SET_IRQS service time in the server (a vCPU waits at least this); p99 is a "
           "log2-bucket upper bound"),
    Column("RD/WR", ("s.region_r", "s.region_w"), "server",
           "REGION_READ / REGION_WRITE(+WRITE_MULTI) messages"),
    Column("MC wr", ("s.mc_writes",), "server", "Message Control config writes"),
    Column("msix fast/slow", ("s.fast", "s.slow"), "server",
           "MSI-X events (PBA, Message Control, SET_IRQS) served on the fast path / with a "
           "slow-path round trip"),
    Column("dlv/pend", ("s.delivered", "s.pended"), "server",
           "vectors signalled to QEMU / held pending"),
    Column("slow ms", ("s.slow_cpu_ms",), "server",
           "slow-path worker CPU in the window (ms; scheduler run time, ns precision)"),
    Column("io ms", ("s.io_cpu_ms",), "server", "server I/O process CPU in the window (ms)"),
)


def fmt_value(v: Value, decimals: int = 0) -> str:
    if v is None:
        return NOT_MEASURED
    if isinstance(v, str):
        return v
    if isinstance(v, float) and decimals == 0 and abs(v) < 10 and v != int(v):
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.{decimals}f}"
    return str(v)


def cell(row: Row, col: Column) -> str:
    values = [row.metrics.get(k) for k in col.keys]
    if all(v is None for v in values):
        return NOT_MEASURED
    if all(v == NA for v in values):
        return NA
    return "/".join(fmt_value(v, col.decimals) for v in values)


def table_rows(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    headers = ["policy", "phase", *[c.header for c in COLUMNS]]
    body = [[r.policy, r.phase.name, *[cell(r, c) for c in COLUMNS]] for r in rows]
    return headers, body


def text_table(rows: Sequence[Row]) -> str:
    headers, body = table_rows(rows)
    if not body:
        return "(no results: every run failed, see the problems below)"
    widths = [max([len(h), *(len(b[i]) for b in body)]) for i, h in enumerate(headers)]
    layers = ["", ""] + [c.layer for c in COLUMNS]
    # A first header line naming the layer over each group of columns.
    groups: list[str] = []
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[i]:
            j += 1
        span = sum(widths[i : j + 1]) + 2 * (j - i)
        groups.append(f"{layers[i]:^{span}}" if layers[i] else " " * span)
        i = j + 1
    lines = ["  ".join(groups).rstrip()]
    lines.append("  ".join(h.rjust(w) if k > 1 else h.ljust(w)
                           for k, (h, w) in enumerate(zip(headers, widths, strict=True))))
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(v.rjust(w) if k > 1 else v.ljust(w)
                               for k, (v, w) in enumerate(zip(b, widths, strict=True))))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    headers, body = table_rows(rows)
    layers = ["", ""] + [c.layer for c in COLUMNS]
    hdr = [f"{h} ({layer})" if layer else h for h, layer in zip(headers, layers, strict=True)]
    out = ["| " + " | ".join(hdr) + " |", "|" + "|".join(
        ["---", "---"] + ["---:"] * len(COLUMNS)) + "|"]
    out += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(out)


def legend() -> str:
    lines = [f"- **{c.header}** ({c.layer}): {c.legend}" for c in COLUMNS]
    lines.append(f"- `{NOT_MEASURED}`: not measured on this run (e.g. KVM statistics under "
                 f"TCG); `{NA}`: does not apply. A 0 is a measured zero.")
    return "\n".join(lines)


def checks_text(checks: Sequence[Check]) -> str:
    return "\n".join(c.line() for c in checks)


def _md_kv_table(title: str, data: dict[str, dict[str, Any]], value_fmt: str = "{}") -> str:
    """A table with one column per scenario, one row per key. Every source here was
    measured, so a key a scenario lacks is a measured 0."""
    keys = sorted({k for d in data.values() for k in d})
    if not keys:
        return f"*{title}: nothing recorded.*\n"
    cols = list(data)
    out = [f"**{title}**", "", "| | " + " | ".join(cols) + " |",
           "|---|" + "---:|" * len(cols)]
    for k in keys:
        vals = []
        for c in cols:
            v = data[c].get(k, 0)
            vals.append(NOT_MEASURED if v is None else value_fmt.format(v))
        out.append(f"| {k} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def markdown_report(doc: dict[str, Any], rows: Sequence[Row], checks: Sequence[Check]) -> str:
    info = doc["info"]
    parts = [
        f"# vmsi-server main job — {info['started']}",
        "",
        f"QEMU {info.get('qemu_version', '?')}, guest kernel {info.get('kernel_version', '?')}, "
        f"accelerator **{info['accel']}** ({info['accel_reason']}); KVM statistics: "
        f"{info['kvm_stats']}; QEMU trace: {info['trace_mode']}.",
        f"{info['vfs']} VF(s)/guest(s), {info['vcpus']} vCPUs, {info['memory_mb']} MB, "
        f"iperf3 {info['duration']} s per phase, storm interval {info['storm_interval_us']} us; "
        f"wall time {info.get('wall_seconds', 0):.0f} s.",
        "",
        "## Comparison",
        "",
        markdown_table(rows),
        "",
        legend(),
        "",
        "## Consistency between layers",
        "",
        "```",
        checks_text(checks),
        "```",
        "",
        "Lifetime checks cover one QEMU process from realize to quit (the server's counters "
        "before QEMU started and after it disconnected); phase checks cover one PHASE window "
        "and are approximate at the edges.",
        "",
        "## Details per scenario",
        "",
    ]
    msgs: dict[str, dict[str, Any]] = {}
    paths: dict[str, dict[str, Any]] = {}
    trace: dict[str, dict[str, Any]] = {}
    kvm: dict[str, dict[str, Any]] = {}
    for r in rows:
        name = f"{r.policy}/{r.phase.name}"
        msgs[name] = {k: v["count"] for k, v in r.server.messages.items()}
        paths[name] = {f"{reg}/{kind} [{path}]": v["count"]
                       for (reg, kind, path), v in r.server.msix.items()}
        if r.trace is not None:
            trace[name] = dict(r.trace)
        if r.kvm is not None:
            kvm[name] = {k.split("/", 2)[-1]: v for k, v in r.kvm.items()}
    parts.append(_md_kv_table("Server: messages by command (window)", msgs))
    parts.append(_md_kv_table("Server: MSI-X events by region/kind and path (window)", paths))
    if trace:
        parts.append(_md_kv_table("QEMU: trace events (window)", trace))
    else:
        parts.append("*QEMU trace: not recorded on this run.*\n")
    if kvm:
        parts.append(_md_kv_table("KVM statistics, deltas (window)", kvm, "{:g}"))
    else:
        parts.append("*KVM statistics: not available (no `kvm` provider in query-stats; "
                     "TCG). Not zero: not measured.*\n")
    parts += ["## Runs", ""]
    for run in doc["runs"]:
        parts.append(
            f"- {run['policy']}: boot {', '.join(f'{b:.1f}' for b in run['boot_seconds'])} s; "
            f"run {run['wall_seconds']:.1f} s; trace lines {run.get('trace_lines')} "
            f"(reader CPU {run.get('trace_reader_cpu', 0):.1f} s); run dirs "
            f"{', '.join(run['run_dirs'])}"
        )
    return "\n".join(parts) + "\n"


def plot(rows: Sequence[Row], path: Path, title: str) -> bool:
    """Four bar charts (throughput, SET_IRQS, SET_IRQS latency, slow-path CPU)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    policies = list(dict.fromkeys(r.policy for r in rows))
    phases = list(dict.fromkeys(r.phase.name for r in rows))
    panels = [
        ("mbps", "throughput (Mbit/s)"),
        ("s.set_irqs", "SET_IRQS messages"),
        ("s.set_irqs_mean_us", "SET_IRQS service time, mean (µs)"),
        ("s.slow_cpu_ms", "slow-path CPU (ms)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    width = 0.8 / max(1, len(policies))
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        for i, pol in enumerate(policies):
            xs, ys, notes = [], [], []
            for j, ph in enumerate(phases):
                row = next((r for r in rows if r.policy == pol and r.phase.name == ph), None)
                v = None if row is None else row.metrics.get(key)
                x = j + (i - (len(policies) - 1) / 2) * width
                if isinstance(v, int | float):
                    xs.append(x)
                    ys.append(v)
                else:
                    notes.append((x, NOT_MEASURED if v is None else NA))
            ax.bar(xs, ys, width, label=pol)
            for x, text in notes:
                ax.text(x, 0, text, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(phases)), phases)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_outputs(
    out_dir: Path, stamp: str, doc: dict[str, Any], rows: Sequence[Row], checks: Sequence[Check]
) -> dict[str, Path]:
    """``mainjob-<stamp>.{md,png,json}`` and ``latest.{md,png,json}`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    md = markdown_report(doc, rows, checks)
    base = out_dir / f"mainjob-{stamp}"
    (base.with_suffix(".md")).write_text(md)
    (base.with_suffix(".json")).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    written["md"], written["json"] = base.with_suffix(".md"), base.with_suffix(".json")
    info = doc["info"]
    title = (f"vmsi-server main job {info['started']} ({info['accel']}, {info['vfs']} VF, "
             f"{info['duration']} s/phase)")
    if plot(rows, base.with_suffix(".png"), title):
        written["png"] = base.with_suffix(".png")
    for kind, path in list(written.items()):
        latest = out_dir / f"latest.{kind}"
        latest.write_bytes(path.read_bytes())
    return written
