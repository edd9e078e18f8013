"""Per-window figures from every layer, and the checks where two layers count alike.

Layers and their sources:

* guest: /proc/interrupts and iperf3 (``workload.GuestPhaseData``);
* hypervisor: KVM statistics from QMP ``query-stats`` (None under TCG);
* QEMU: trace-event counts from the trace FIFO (``tracecount``), None if not traced;
* server: its control-socket snapshot (``vmsi_server.telemetry``).

Values are ``None`` when not measured and ``NA`` when the question does not apply
(no storm, no moves). Neither is ever turned into 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .workload import GuestPhaseData, Phase

NA = "—"  # not applicable (e.g. affinity moves in a run without the storm)
Value = float | int | str | None

#: KVM statistics shown in the table (all deltas are in the report and the JSON).
KVM_MAIN = ("exits", "mmio_exits", "io_exits", "irq_exits", "halt_exits", "irq_injections")


# --- server snapshots -----------------------------------------------------------------


def _buckets_delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    out = {b: n - before.get(b, 0) for b, n in after.items()}
    return {b: n for b, n in out.items() if n}


def _msg_upper_us(buckets: Mapping[str, int], fraction: float) -> float | None:
    """Upper bound (us) of the message-histogram bucket holding ``fraction`` of samples
    (bucket b holds [2^b, 2^(b+1)) ns, see telemetry/messages.py)."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    seen = 0
    for b in sorted(buckets, key=int):
        seen += buckets[b]
        if seen >= fraction * total:
            return (1 << (int(b) + 1)) / 1000
    return None


@dataclass
class ServerDelta:
    """One device's server counters over a window (plus server-wide CPU)."""

    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    msix: dict[tuple[str, str, str], dict[str, float]] = field(default_factory=dict)
    named: dict[str, int] = field(default_factory=dict)
    nic: dict[str, int] = field(default_factory=dict)
    eventfd_swaps: int | None = None
    io_cpu_s: float | None = None
    slow_cpu_s: float | None = None
    slow_round_trips: int | None = None

    def count(self, command: str) -> int:
        return int(self.messages.get(command, {}).get("count", 0))

    def msix_count(self, region: str, kind: str, path: str | None = None) -> int:
        return int(
            sum(
                v["count"]
                for (r, k, p), v in self.msix.items()
                if r == region and k == kind and (path is None or p == path)
            )
        )

    def msix_by_path(self) -> tuple[int, int]:
        """MSI-X events received from the client (not device-side delivery): (fast, slow)."""
        fast = slow = 0
        for (region, _kind, path), v in self.msix.items():
            if region == "msix-vector":
                continue
            if path == "fast":
                fast += int(v["count"])
            else:
                slow += int(v["count"])
        return fast, slow

    def mean_us(self, command: str) -> float | None:
        m = self.messages.get(command)
        if not m or not m.get("count") or m.get("total_ns") is None:
            return None
        return float(m["total_ns"]) / float(m["count"]) / 1000

    def p99_us(self, command: str) -> float | None:
        m = self.messages.get(command)
        return _msg_upper_us(m.get("log2_buckets", {}), 0.99) if m else None

    def merge(self, other: ServerDelta) -> ServerDelta:
        """Sum of two devices' deltas (CPU is server-wide: the caller sets it)."""
        out = ServerDelta()
        for src in (self, other):
            for cmd, m in src.messages.items():
                d = out.messages.setdefault(cmd, {"count": 0, "errors": 0, "total_ns": 0,
                                                  "log2_buckets": {}})
                d["count"] += m.get("count", 0)
                d["errors"] += m.get("errors", 0)
                if m.get("total_ns") is None or d["total_ns"] is None:
                    d["total_ns"] = None
                else:
                    d["total_ns"] += m["total_ns"]
                for b, n in m.get("log2_buckets", {}).items():
                    d["log2_buckets"][b] = d["log2_buckets"].get(b, 0) + n
            for key, v in src.msix.items():
                d2 = out.msix.setdefault(key, {"count": 0, "total_ns": 0.0})
                d2["count"] += v["count"]
                d2["total_ns"] += v.get("total_ns", 0.0)
            for k, n in src.named.items():
                out.named[k] = out.named.get(k, 0) + n
            for k, n in src.nic.items():
                out.nic[k] = out.nic.get(k, 0) + n
            if src.eventfd_swaps is not None:
                out.eventfd_swaps = (out.eventfd_swaps or 0) + src.eventfd_swaps
        return out


def server_delta(before: dict[str, Any], after: dict[str, Any], device: str) -> ServerDelta:
    """Counters of ``device`` (e.g. ``vf0``) between two control-socket snapshots."""
    b = before["devices"][device]
    a = after["devices"][device]
    d = ServerDelta()
    for cmd, s in a.get("messages", {}).items():
        sb = b.get("messages", {}).get(cmd, {})
        count = s.get("count", 0) - sb.get("count", 0)
        errors = s.get("errors", 0) - sb.get("errors", 0)
        if not (count or errors):
            continue
        total = s.get("total_ns")
        d.messages[cmd] = {
            "count": count,
            "errors": errors,
            "total_ns": None if total is None else total - sb.get("total_ns", 0),
            "log2_buckets": _buckets_delta(s.get("log2_buckets", {}), sb.get("log2_buckets", {})),
        }
    rows_b = {(r["region"], r["kind"], r["path"]): r for r in b.get("msix", {}).get("accesses", [])}
    for r in a.get("msix", {}).get("accesses", []):
        key = (r["region"], r["kind"], r["path"])
        rb = rows_b.get(key, {"count": 0, "latency": {}})
        n = r["count"] - rb["count"]
        if n:
            la, lb = r.get("latency", {}), rb.get("latency", {})
            ta = la.get("total_ns", la.get("mean_ns", 0.0) * la.get("count", 0))
            tb = lb.get("total_ns", lb.get("mean_ns", 0.0) * lb.get("count", 0))
            d.msix[key] = {"count": n, "total_ns": float(ta - tb)}
    ca, cb = a.get("msix", {}).get("counters", {}), b.get("msix", {}).get("counters", {})
    d.named = {k: v - cb.get(k, 0) for k, v in ca.items() if v - cb.get(k, 0)}
    na, nb = a.get("nic", {}) or {}, b.get("nic", {}) or {}
    d.nic = {k: v - nb.get(k, 0) for k, v in na.items() if isinstance(v, int | float)}
    if a.get("eventfd_swaps") is not None and b.get("eventfd_swaps") is not None:
        d.eventfd_swaps = a["eventfd_swaps"] - b["eventfd_swaps"]
    d.io_cpu_s, d.slow_cpu_s = cpu_delta(before, after)
    d.slow_round_trips = slow_round_trips(after) - slow_round_trips(before) if (
        after.get("slowpath") and before.get("slowpath")) else None
    return d


def cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> tuple[float | None, float | None]:
    """(I/O process, slow-path worker) CPU seconds between two snapshots.

    Prefers the scheduler's run time (``*_exec_seconds``, ns precision) over the
    clock-tick figures, which are too coarse for a window of a few seconds.
    A worker restart inside the window makes the slow-path figure unknown.
    """
    out: list[float | None] = []
    cb, ca = before.get("cpu", {}), after.get("cpu", {})
    for exact, ticks in (("io_process_exec_seconds", "io_process_seconds"),
                         ("slowpath_exec_seconds", "slowpath_seconds")):
        key = exact if ca.get(exact) is not None and cb.get(exact) is not None else ticks
        a, b = ca.get(key), cb.get(key)
        out.append(None if a is None or b is None else max(0.0, a - b))
    sa, sb = after.get("slowpath") or {}, before.get("slowpath") or {}
    if sa.get("pid") != sb.get("pid") or sa.get("restarts") != sb.get("restarts"):
        out[1] = None
    return out[0], out[1]


def slow_round_trips(snap: dict[str, Any]) -> int:
    sp = snap.get("slowpath") or {}
    return int(sum(r["count"] for r in sp.get("counters", {}).get("accesses", [])))


# --- one phase of one guest ---------------------------------------------------------


@dataclass
class PhaseResult:
    policy: str
    vf: int
    phase: Phase
    t0: float  # host wall clock (time.time()) at PHASE_BEGIN / PHASE_END
    t1: float
    guest: GuestPhaseData
    server: ServerDelta
    kvm: dict[str, float] | None  # query-stats deltas; None: no KVM provider
    trace: dict[str, int] | None  # trace counts in [t0, t1); None: not traced

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


def kvm_value(kvm: Mapping[str, float] | None, name: str) -> float | None:
    """A vCPU statistic summed over vCPUs (``vcpu/kvm/<name>``), or a VM one."""
    if kvm is None:
        return None
    for key in (f"vcpu/kvm/{name}", f"vm/kvm/{name}"):
        if key in kvm:
            return kvm[key]
    return None


def _sum_opt(values: Iterable[float | None]) -> float | None:
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None
    return sum(v for v in vals if v is not None)


# --- table rows ---------------------------------------------------------------------


@dataclass
class Row:
    """One (policy, phase) line of the comparison, summed over the VFs."""

    policy: str
    phase: Phase
    vfs: int
    metrics: dict[str, Value]
    server: ServerDelta
    kvm: dict[str, float] | None
    trace: dict[str, int] | None


def make_row(
    results: list[PhaseResult],
    window_cpu: tuple[float | None, float | None],
    *,
    mmio_traced: bool,
) -> Row:
    """Aggregate the VFs' results of one (policy, phase); CPU is the server's over
    the union of their windows (``window_cpu``). Without ``mmio_traced`` QEMU's
    MSI-X table and PBA accesses were not counted (None, not 0)."""
    first = results[0]
    srv = results[0].server
    for r in results[1:]:
        srv = srv.merge(r.server)
    io_cpu, slow_cpu = window_cpu
    srv.io_cpu_s, srv.slow_cpu_s = io_cpu, slow_cpu
    kvm: dict[str, float] | None = None
    if all(r.kvm is not None for r in results):
        kvm = {}
        for r in results:
            for k, v in (r.kvm or {}).items():
                kvm[k] = kvm.get(k, 0) + v
    trace: dict[str, int] | None = None
    if all(r.trace is not None for r in results):
        trace = {}
        for r in results:
            for k, n in (r.trace or {}).items():
                trace[k] = trace.get(k, 0) + n
    m: dict[str, Value] = {}
    rates = [r.guest.iperf.received_bps if r.guest.iperf else None for r in results]
    total_bps = _sum_opt(rates)
    m["mbps"] = None if total_bps is None else total_bps / 1e6
    m["seconds"] = max(r.seconds for r in results)
    m["guest_irqs"] = sum(r.guest.irq_total for r in results)
    if first.phase.storm:
        moves = [r.guest.moves for r in results]
        m["moves"] = None if any(x is None for x in moves) else sum(x or 0 for x in moves)
    else:
        m["moves"] = NA
    for name in KVM_MAIN:
        m[f"kvm.{name}"] = kvm_value(kvm, name)

    def tr(*keys: str) -> int | None:
        return None if trace is None else sum(trace.get(k, 0) for k in keys)

    mmio = trace is not None and mmio_traced
    m["q.table_r"] = tr("mmio.msix-table.read") if mmio else None
    m["q.table_w"] = tr("mmio.msix-table.write") if mmio else None
    m["q.pba_r"] = tr("mmio.vfio-pba.read") if mmio else None
    m["q.use"] = tr("msix.vector_use")
    m["q.release"] = tr("msix.vector_release")
    m["q.msi"] = tr("vfio.msi_interrupt")
    m["q.set_irqs"] = tr("vfio_user.set_irqs")
    m["q.region_rw"] = tr("vfio_user.region_rw")
    m["s.set_irqs"] = srv.count("DEVICE_SET_IRQS")
    m["s.set_irqs_mean_us"] = srv.mean_us("DEVICE_SET_IRQS") if srv.count("DEVICE_SET_IRQS") else NA
    m["s.set_irqs_p99_us"] = srv.p99_us("DEVICE_SET_IRQS") if srv.count("DEVICE_SET_IRQS") else NA
    m["s.region_r"] = srv.count("REGION_READ")
    m["s.region_w"] = srv.count("REGION_WRITE") + srv.count("REGION_WRITE_MULTI")
    m["s.mc_writes"] = srv.msix_count("msix-config", "message-control")
    m["s.pba_r"] = srv.msix_count("msix-pba", "read")
    fast, slow = srv.msix_by_path()
    m["s.fast"], m["s.slow"] = fast, slow
    m["s.delivered"] = srv.msix_count("msix-vector", "delivered") + srv.msix_count(
        "msix-vector", "redelivered")
    m["s.pended"] = srv.msix_count("msix-vector", "pended")
    m["s.slow_cpu_ms"] = None if slow_cpu is None else slow_cpu * 1000
    m["s.io_cpu_ms"] = None if io_cpu is None else io_cpu * 1000
    return Row(first.policy, first.phase, len(results), m, srv, kvm, trace)


# --- consistency --------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """Two layers' counts of the same thing.

    ``relation``: ``==`` exact; ``<=``; ``~`` equal within ``tolerance`` (a
    fraction, for windowed counts whose edges the two layers see a little apart).
    ``ok`` is None when one side was not measured.
    """

    scope: str
    what: str
    left_label: str
    left: float | None
    relation: str
    right_label: str
    right: float | None
    tolerance: float = 0.0
    strict: bool = True  # a failed strict check fails the job

    @property
    def ok(self) -> bool | None:
        if self.left is None or self.right is None:
            return None
        if self.relation == "==":
            return self.left == self.right
        if self.relation == "<=":
            return self.left <= self.right
        slack = max(2.0, self.tolerance * max(abs(self.left), abs(self.right)))
        return abs(self.left - self.right) <= slack

    def line(self) -> str:
        status = {True: "OK  ", False: "FAIL" if self.strict else "WARN", None: "n/m "}[self.ok]
        rel = {"~": "≈", "<=": "≤"}.get(self.relation, self.relation)

        def fmt(v: float | None) -> str:
            return "n/m" if v is None else f"{v:g}"

        return (
            f"consistency {status} {self.scope}: {self.what}: {self.left_label} {fmt(self.left)}"
            f" {rel} {self.right_label} {fmt(self.right)}"
        )


def lifetime_checks(
    scope: str, trace: Mapping[str, int] | None, server: ServerDelta, mmio_traced: bool
) -> list[Check]:
    """Whole QEMU lifetime (realize .. quit) of one guest: QEMU's trace vs the server."""

    def t(*keys: str) -> int | None:
        return None if trace is None else sum(trace.get(k, 0) for k in keys)

    s = server
    checks = [
        Check(scope, "SET_IRQS messages", "QEMU vfio_user_set_irqs", t("vfio_user.set_irqs"),
              "==", "server DEVICE_SET_IRQS", s.count("DEVICE_SET_IRQS")),
        Check(scope, "REGION_READ+WRITE messages", "QEMU vfio_user_region_rw",
              t("vfio_user.region_rw"), "==", "server REGION_READ+REGION_WRITE",
              s.count("REGION_READ") + s.count("REGION_WRITE")),
        Check(scope, "WRITE_MULTI messages", "QEMU vfio_user_wrmulti flush",
              t("vfio_user.wrmulti_flush"), "==", "server REGION_WRITE_MULTI",
              s.count("REGION_WRITE_MULTI")),
        Check(scope, "DMA_MAP messages", "QEMU vfio_user_dma_map", t("vfio_user.dma_map"),
              "==", "server DMA_MAP", s.count("DMA_MAP")),
        Check(scope, "Message Control writes", "QEMU vfio_pci_write_config in MSI-X cap",
              t("pci.write_config.msix"), "==", "server msix-config/message-control",
              s.msix_count("msix-config", "message-control")),
        Check(scope, "interrupts", "QEMU vfio_msi_interrupt", t("vfio.msi_interrupt"), "<=",
              "server eventfd writes (delivered+redelivered)",
              s.msix_count("msix-vector", "delivered")
              + s.msix_count("msix-vector", "redelivered")),
    ]
    if mmio_traced:
        checks += [
            Check(scope, "PBA reads", "QEMU MMIO 'VFIO MSIX PBA' reads", t("mmio.vfio-pba.read"),
                  "==", "server msix-pba/read", s.msix_count("msix-pba", "read")),
            Check(scope, "BAR accesses sent", "QEMU MMIO to the device's BARs + PBA reads",
                  t("mmio.vfio-bar.read", "mmio.vfio-bar.write", "mmio.vfio-pba.read"), "==",
                  "QEMU vfio_user_region_rw (non-config) + wrmulti adds",
                  None if trace is None else (
                      trace.get("vfio_user.region_rw", 0)
                      - trace.get("vfio_user.region_rw.config", 0)
                      + trace.get("vfio_user.wrmulti_add", 0))),
        ]
    return checks


def phase_checks(scope: str, r: PhaseResult, accel: str) -> list[Check]:
    """Windowed (PHASE_BEGIN..PHASE_END) comparisons: edges make them approximate."""
    tr = r.trace
    out = []
    if accel == "tcg":
        # Under TCG every unmask sends one SET_IRQS, a mask none (msix-in-qemu.md §4).
        out.append(Check(scope, "unmask -> SET_IRQS", "QEMU vfio_msix_vector_do_use",
                         None if tr is None else tr.get("msix.vector_use", 0), "~",
                         "server DEVICE_SET_IRQS", r.server.count("DEVICE_SET_IRQS"),
                         tolerance=0.02, strict=False))
        # Under TCG every device interrupt reaches the guest through QEMU's eventfd.
        out.append(Check(scope, "interrupts into the guest", "guest /proc/interrupts (eth0)",
                         r.guest.irq_total, "~", "QEMU vfio_msi_interrupt",
                         None if tr is None else tr.get("vfio.msi_interrupt", 0),
                         tolerance=0.05, strict=False))
    else:
        out.append(Check(scope, "mask+unmask -> SET_IRQS",
                         "QEMU vfio_msix_vector_do_use+release",
                         None if tr is None else tr.get("msix.vector_use", 0)
                         + tr.get("msix.vector_release", 0), "~", "server DEVICE_SET_IRQS",
                         r.server.count("DEVICE_SET_IRQS"), tolerance=0.02, strict=False))
    return out
