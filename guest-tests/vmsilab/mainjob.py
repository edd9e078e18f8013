"""The main job: every layer's counters, each MSI-X path policy, one comparison.

``python -m vmsilab.mainjob`` (guest-tests on sys.path; ``make run``) builds the
lab if needed, then for each path policy (shadow, legacy, forward-all) starts the
server in a fresh network namespace, boots the guest(s) with the server's VF and
runs iperf3 guest->peer and peer->guest, first quiet, then under an affinity
storm that makes the guest mask/unmask its MSI-X vectors. Around each phase it
reads:

* the guest: iperf3 throughput, /proc/interrupts, affinity moves;
* KVM: ``query-stats`` deltas (exits, mmio_exits, ...), when the guest runs under
  a KVM that has a stats provider (never under TCG: then "n/m", not 0);
* QEMU: trace-event counts streamed from a FIFO (MSI-X table/PBA accesses,
  vector use/release, vfio-user messages sent), timestamped so windows match;
* the server: messages by command with service time, MSI-X events by path,
  SET_IRQS swaps, interrupts delivered and held pending, slow-path CPU.

It prints one table (stdout), a consistency line per pair of layers that count
the same thing, and writes the same as Markdown, PNG and JSON into ``--out``
(``mainjob-<timestamp>.*`` and ``latest.*``). Progress goes to stderr.
Exit status: 0 when every run produced throughput and every strict check held.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from .accel import Accel, detect_accel
from .config import LabConfig, LabError
from .guest import POWEROFF_RE, RC_RE, READY_RE, Guest
from .measure import (
    Check,
    PhaseResult,
    Row,
    ServerDelta,
    cpu_delta,
    lifetime_checks,
    make_row,
    phase_checks,
    server_delta,
)
from .netns import IPERF3_PORT, NetNs
from .proc import run
from .progress import setup_logging, step
from .report import checks_text, text_table, write_outputs
from .tracecount import MMIO_EVENTS, NARROW_EVENTS, TraceStream
from .vfserver import REPO_ROOT, VfServer
from .workload import BEGIN_RE, END_RE, Phase, guest_script, parse_phase, phases

log = logging.getLogger("vmsilab")

POLICIES = ("shadow", "legacy", "forward-all")
TRACE_MODES = ("all", "narrow", "off")


@dataclass
class JobOptions:
    """Everything the CLI can set (see ``build_parser`` for the meaning)."""

    vcpus: int = 2
    memory_mb: int = 512
    duration: int = 8
    policies: tuple[str, ...] = POLICIES
    accel: str = "auto"
    vfs: int = 1
    storms: tuple[bool, ...] = (False, True)
    directions: tuple[str, ...] = ("tx", "rx")
    storm_interval_us: int = 10_000
    trace: str = "all"
    settle: float = 0.5
    out: Path = REPO_ROOT / "results"
    build: bool = True

    def trace_events(self) -> tuple[str, ...]:
        if self.trace == "off":
            return ()
        return NARROW_EVENTS + (MMIO_EVENTS if self.trace == "all" else ())


# --- one policy ------------------------------------------------------------------------


@dataclass
class Mark:
    """The layers' state at one PHASE marker of one guest."""

    t: float
    server: dict[str, Any]
    kvm: dict[str, float] | None


@dataclass
class PolicyRun:
    policy: str
    results: list[PhaseResult] = field(default_factory=list)
    marks: dict[tuple[int, str, str], Mark] = field(default_factory=dict)  # (vf, phase, begin|end)
    lifetime: list[tuple[str, dict[str, int] | None, ServerDelta]] = field(default_factory=list)
    boot_seconds: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    run_dirs: list[str] = field(default_factory=list)
    trace_lines: int | None = None
    trace_reader_cpu: float = 0.0
    kvm_schema: list[str] | None = None
    guest_rc: list[int | None] = field(default_factory=list)


def _bridge(ns: NetNs, taps: Sequence[str]) -> None:
    """br0 in the namespace with every VF's tap enslaved and the peer address on it."""
    for tap in taps:
        deadline = time.monotonic() + 10
        while not ns.link_exists(tap):
            if time.monotonic() > deadline:
                raise LabError(f"link {tap} did not appear in netns {ns.name}")
            time.sleep(0.05)
    n = ns.name
    run(["ip", "-n", n, "link", "add", "br0", "type", "bridge", "forward_delay", "0"])
    for tap in taps:
        run(["ip", "-n", n, "link", "set", tap, "master", "br0"])
        run(["ip", "-n", n, "link", "set", tap, "up"])
    run(["ip", "-n", n, "addr", "add", ns.address, "dev", "br0"])
    run(["ip", "-n", n, "link", "set", "br0", "up"])


def _iperf3_servers(lab: LabConfig, ns: NetNs, ports: Sequence[int]) -> None:
    """One daemonized iperf3 -s per guest (one server serves one test at a time);
    they die with the namespace."""
    for port in ports:
        pidfile = ns.run_dir / f"iperf3-{port}.pid"
        run([*lab.env_prefix(ns.name), "iperf3", "-s", "-B", ns.peer_ip, "-p", str(port), "-D",
             "--pidfile", str(lab.inner_path(pidfile)),
             "--logfile", str(lab.inner_path(ns.run_dir / f"iperf3-{port}.log"))])
    deadline = time.monotonic() + 10
    while True:
        out = run(["ip", "netns", "exec", ns.name, "ss", "-Hltn"], check=False).stdout
        if all(f":{p} " in out for p in ports):
            return
        if time.monotonic() > deadline:
            raise LabError(f"iperf3 servers did not start on {ports}:\n{out}")
        time.sleep(0.05)


def _wait_disconnected(server: VfServer, timeout: float = 10.0) -> dict[str, Any]:
    """The server's counters once no client is connected (it has read everything)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = server.counters()
        if not any(d.get("connected") for d in snap["devices"].values()):
            return snap
        if time.monotonic() > deadline:
            log.warning("a client is still connected %.0f s after QEMU quit", timeout)
            return snap
        time.sleep(0.05)


def _expectations(phase_list: Sequence[Phase], duration: int, boot_timeout: float
                  ) -> list[tuple[str, str, str, float]]:
    """(event, phase name, pattern, timeout) in the order a guest prints them."""
    out = [("ready", "", READY_RE.decode(), boot_timeout)]
    for p in phase_list:
        out.append(("begin", p.name, BEGIN_RE.format(name=p.name), 120.0))
        out.append(("end", p.name, END_RE.format(name=p.name), duration + 120.0))
    out.append(("rc", "", RC_RE.decode(), 120.0))
    out.append(("poweroff", "", POWEROFF_RE.decode(), 60.0))
    return out


def run_policy(
    lab: LabConfig, opts: JobOptions, policy: str, accel: Accel, phase_list: Sequence[Phase]
) -> PolicyRun:
    """One server with ``opts.vfs`` VFs under ``policy``; one guest per VF, all
    running ``phase_list``; every layer read at every phase marker."""
    pr = PolicyRun(policy)
    t_start = time.monotonic()
    events = opts.trace_events()
    n = opts.vfs
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(NetNs(lab, tap=None))
        server = stack.enter_context(
            VfServer(lab, ns, vfs=n, policy=policy, configure_taps=(n == 1)))
        ports = [IPERF3_PORT + i for i in range(n)]
        if n == 1:
            ns.start_iperf3()
        else:
            _bridge(ns, server.taps)
            _iperf3_servers(lab, ns, ports)
        base = server.counters()
        guests: list[Guest] = []
        streams: list[TraceStream | None] = []
        for i in range(n):
            extra: list[str] = []
            stream: TraceStream | None = None
            if events:
                fifo = ns.run_dir / f"trace-vf{i}.fifo"
                stream = TraceStream(fifo, kept=ns.run_dir / f"trace-vf{i}-msix.log").start()
                stack.callback(stream.close)  # after the guest below has quit (LIFO)
                extra = TraceStream.qemu_args(events, str(lab.inner_path(fifo)))
            streams.append(stream)
            guest = stack.enter_context(Guest(
                lab, netns=ns, name=f"{policy}-vf{i}", memory_mb=opts.memory_mb,
                smp=opts.vcpus, accel=accel, devices=[server.device_arg(i)],
                extra_args=extra, lab_ip=f"10.0.0.{2 + i}/24"))
            guests.append(guest)
            pr.run_dirs.append(str(guest.run_dir))
        for i, guest in enumerate(guests):
            guest.boot(script=guest_script(
                list(phase_list), peer=ns.peer_ip, port=ports[i], seconds=opts.duration,
                vcpus=opts.vcpus, storm_interval_us=opts.storm_interval_us, settle=opts.settle))
        _drive(pr, guests, server, phase_list, opts)
        outputs = [g.serial for g in guests]
        for guest in guests:
            guest.close()  # QMP quit: the trace FIFO reaches EOF, the session closes
        final = _wait_disconnected(server)
        for i, stream in enumerate(streams):
            if stream is not None:
                stream.close()
                pr.trace_reader_cpu += stream.busy_seconds
                pr.trace_lines = (pr.trace_lines or 0) + stream.counts.lines
            dev = f"vf{i}"
            totals = stream.counts.total() if stream is not None else None
            pr.lifetime.append((f"{policy}/{dev}", totals, server_delta(base, final, dev)))
        for i, out in enumerate(outputs):
            for p in phase_list:
                b, e = pr.marks[(i, p.name, "begin")], pr.marks[(i, p.name, "end")]
                kvm = None
                if b.kvm is not None and e.kvm is not None:
                    kvm = {k: e.kvm[k] - b.kvm.get(k, 0) for k in e.kvm}
                stream = streams[i]
                pr.results.append(PhaseResult(
                    policy=policy, vf=i, phase=p, t0=b.t, t1=e.t,
                    guest=parse_phase(out, p.name),
                    server=server_delta(b.server, e.server, f"vf{i}"),
                    kvm=kvm,
                    trace=None if stream is None else stream.counts.window(b.t, e.t)))
    pr.wall_seconds = time.monotonic() - t_start
    return pr


def _drive(pr: PolicyRun, guests: Sequence[Guest], server: VfServer,
           phase_list: Sequence[Phase], opts: JobOptions) -> None:
    """Follow every guest's console markers; snapshot all layers at PHASE markers."""
    boot_timeout = guests[0].default_boot_timeout()
    todo = [_expectations(phase_list, opts.duration, boot_timeout) for _ in guests]
    since = [time.monotonic()] * len(guests)
    pr.boot_seconds = [0.0] * len(guests)
    pr.guest_rc = [None] * len(guests)
    while any(todo):
        progressed = False
        for i, guest in enumerate(guests):
            if not todo[i]:
                continue
            event, name, pattern, timeout = todo[i][0]
            m = guest.poll_for(pattern)
            if m is None:
                if time.monotonic() - since[i] > timeout:
                    raise LabError(f"{guest.run_dir.name}: no {pattern!r} within {timeout:.0f} s"
                                   f"\n--- serial tail:\n{guest.serial[-2000:]}")
                continue
            todo[i].pop(0)
            since[i] = time.monotonic()
            progressed = True
            if event == "ready":
                pr.boot_seconds[i] = time.monotonic() - guest.started_at
                log.info("%s: guest vf%d ready after %.1f s", pr.policy, i, pr.boot_seconds[i])
                if pr.kvm_schema is None:
                    pr.kvm_schema = _kvm_schema(guest)
            elif event in ("begin", "end"):
                t = time.time()
                pr.marks[(i, name, event)] = Mark(t, server.counters(), guest.query_stats())
                if event == "begin":
                    log.info("%s: vf%d phase %s ...", pr.policy, i, name)
                else:
                    b = pr.marks[(i, name, "begin")]
                    log.info("%s: vf%d phase %s done in %.1f s", pr.policy, i, name, t - b.t)
            elif event == "rc":
                pr.guest_rc[i] = int(m.group(1))
        if not progressed:
            time.sleep(0.05)


def _kvm_schema(guest: Guest) -> list[str]:
    """Names of the KVM statistics QEMU can report (empty: none, e.g. TCG)."""
    try:
        schemas = guest.qmp.execute("query-stats-schemas") or []
    except Exception as e:  # an old QEMU: no stats at all
        log.info("query-stats-schemas failed: %s", e)
        return []
    # Other providers (cryptodev, ...) have nothing to do with exits.
    return sorted(f"{s.get('target')}/kvm/{st.get('name')}"
                  for s in schemas if s.get("provider") == "kvm" for st in s.get("stats", []))


# --- the whole job ---------------------------------------------------------------------


@dataclass
class JobResult:
    rows: list[Row]
    checks: list[Check]
    doc: dict[str, Any]
    table: str
    written: dict[str, Path]
    ok: bool
    problems: list[str]


def resolve_accel(name: str) -> Accel:
    if name == "auto":
        return detect_accel()
    if name in ("kvm", "tcg"):
        return Accel(name, f"--accel {name}")
    raise LabError(f"--accel must be auto, tcg or kvm, not {name!r}")


def run_job(opts: JobOptions, lab: LabConfig | None = None) -> JobResult:
    lab = lab or LabConfig.from_env()
    started = dt.datetime.now()
    t0 = time.monotonic()
    if opts.build:
        from .build import build

        with step("lab build (reuses what is already built)"):
            build(lab)
    accel = resolve_accel(opts.accel)
    log.info("accelerator: %s (%s)", accel.name, accel.reason)
    phase_list = phases(opts.directions, opts.storms)
    runs: list[PolicyRun] = []
    problems: list[str] = []
    for policy in opts.policies:
        try:
            with step(f"policy {policy}: {opts.vfs} guest(s), phases "
                      f"{', '.join(p.name for p in phase_list)}"):
                runs.append(run_policy(lab, opts, policy, accel, phase_list))
        except LabError as e:  # GuestError too: keep the other policies' figures
            log.error("policy %s failed: %s", policy, e)
            problems.append(f"policy {policy} failed: {str(e).splitlines()[0]}")
    rows: list[Row] = []
    checks: list[Check] = []
    mmio = opts.trace == "all"
    for pr in runs:
        for scope, totals, delta in pr.lifetime:
            checks += lifetime_checks(f"{scope} lifetime", totals, delta, mmio)
        for p in phase_list:
            res = [r for r in pr.results if r.phase == p]
            begins = [pr.marks[(r.vf, p.name, "begin")] for r in res]
            ends = [pr.marks[(r.vf, p.name, "end")] for r in res]
            first = min(begins, key=lambda mk: mk.t)
            last = max(ends, key=lambda mk: mk.t)
            rows.append(make_row(res, cpu_delta(first.server, last.server), mmio_traced=mmio))
            for r in res:
                checks += phase_checks(f"{pr.policy}/vf{r.vf}/{p.name}", r, accel.name)
                if r.guest.iperf is None or r.guest.iperf.received_bps <= 0:
                    problems.append(f"{pr.policy}/vf{r.vf}/{p.name}: no throughput "
                                    f"(iperf3 rc={r.guest.iperf_rc}: {r.guest.iperf_error})")
        for i, rc in enumerate(pr.guest_rc):
            if rc != 0:
                problems.append(f"{pr.policy}/vf{i}: guest script rc={rc}")
    problems += [c.line() for c in checks if c.ok is False and c.strict]
    kvm_names = next((pr.kvm_schema for pr in runs if pr.kvm_schema), [])
    info = {
        "started": started.isoformat(timespec="seconds"),
        "accel": accel.name,
        "accel_reason": accel.reason,
        "kvm_stats": (f"{len(kvm_names)} statistics from the kvm provider" if kvm_names
                      else "none (query-stats has no provider: not measured)"),
        "trace_mode": {"all": "narrow events + memory_region_ops (MSI-X table/PBA accesses)",
                       "narrow": "narrow events only (no MSI-X table/PBA access counts)",
                       "off": "off"}[opts.trace],
        "vfs": opts.vfs, "vcpus": opts.vcpus, "memory_mb": opts.memory_mb,
        "duration": opts.duration, "storm_interval_us": opts.storm_interval_us,
        "policies": list(opts.policies), "phases": [p.name for p in phase_list],
        "qemu_version": _state(lab, "qemu-version"),
        "kernel_version": _state(lab, "kernel-version"),
        "wall_seconds": time.monotonic() - t0,
    }
    doc = {
        "info": info,
        "kvm_schema": kvm_names,
        "rows": [{"policy": r.policy, "phase": r.phase.name, "metrics": r.metrics,
                  "server": _jsonable(r.server), "kvm": r.kvm, "trace": r.trace} for r in rows],
        "checks": [{"line": c.line(), "ok": c.ok, "strict": c.strict, "scope": c.scope,
                    "what": c.what, "left": c.left, "right": c.right} for c in checks],
        "runs": [{"policy": pr.policy, "boot_seconds": pr.boot_seconds,
                  "wall_seconds": pr.wall_seconds, "run_dirs": pr.run_dirs,
                  "trace_lines": pr.trace_lines, "trace_reader_cpu": pr.trace_reader_cpu,
                  "guest_rc": pr.guest_rc,
                  "lifetime": [{"scope": s, "trace": t, "server": _jsonable(d)}
                               for s, t, d in pr.lifetime],
                  "phases": [{"vf": r.vf, "phase": r.phase.name, "t0": r.t0, "t1": r.t1,
                              "guest_irqs": r.guest.irqs, "moves": r.guest.moves,
                              "iperf": None if r.guest.iperf is None else vars(r.guest.iperf)}
                             for r in pr.results]}
                 for pr in runs],
        "problems": problems,
    }
    table = text_table(rows)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    written = write_outputs(opts.out, stamp, doc, rows, checks)
    return JobResult(rows, checks, doc, table, written, not problems, problems)


def _state(lab: LabConfig, name: str) -> str | None:
    p = lab.paths.state / name
    return p.read_text().strip() if p.exists() else None


def _jsonable(d: ServerDelta) -> dict[str, Any]:
    return {
        "messages": d.messages,
        "msix": {f"{r}/{k} [{p}]": v for (r, k, p), v in d.msix.items()},
        "named": d.named, "nic": d.nic, "eventfd_swaps": d.eventfd_swaps,
        "io_cpu_s": d.io_cpu_s, "slow_cpu_s": d.slow_cpu_s,
        "slow_round_trips": d.slow_round_trips,
    }


# --- CLI -------------------------------------------------------------------------------


def _csv(choices: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: a comma-separated list of {', '.join(choices)}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vmsilab.mainjob",
        description="Boot guest(s) with the server's 82576 VF under each MSI-X path policy, "
        "run iperf3 both ways with and without an affinity storm, and compare every "
        "layer's counters (guest, KVM or QEMU trace, server) in one table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--vcpus", type=int, default=2,
                   help="guest vCPUs (the storm moves vectors between them; needs >= 2)")
    p.add_argument("--memory", type=int, default=512, help="guest memory in MB")
    p.add_argument("--duration", type=int, default=None,
                   help="iperf3 seconds per phase (default 8, or 3 with --quick)")
    p.add_argument("--policies", type=_csv(POLICIES), default=None,
                   help="comma-separated MSI-X path policies (default all three, or "
                   "shadow,forward-all with --quick)")
    p.add_argument("--directions", type=_csv(("tx", "rx")), default=None,
                   help="iperf3 directions: tx = guest->peer, rx = peer->guest "
                   "(default tx,rx, or tx with --quick)")
    p.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto",
                   help="accelerator: auto uses KVM only with vmx/svm and a usable /dev/kvm")
    p.add_argument("--vfs", type=int, default=1,
                   help="VFs of one server, one guest each (taps bridged on br0 in the netns)")
    storm = p.add_mutually_exclusive_group()
    storm.add_argument("--no-storm", action="store_true", help="only the quiet phases")
    storm.add_argument("--storm-only", action="store_true", help="only the storm phases")
    p.add_argument("--storm-interval-us", type=int, default=10_000,
                   help="guest sleep between two rounds of affinity moves (microseconds)")
    p.add_argument("--trace", choices=TRACE_MODES, default="all",
                   help="QEMU trace events: all (incl. memory_region_ops, the only source of "
                   "MSI-X table/PBA access counts; costs guest speed under TCG), narrow "
                   "(vfio/msix/vfio-user events only), off")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results",
                   help="directory for mainjob-<timestamp>.{md,png,json} and latest.*")
    p.add_argument("--quick", action="store_true",
                   help="short run for CI: 3 s phases, shadow and forward-all, tx only "
                   "(explicit flags still win)")
    p.add_argument("--no-build", action="store_true",
                   help="do not build the lab first (fail if it is not built)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command")
    return p


def options_from_args(args: argparse.Namespace) -> JobOptions:
    quick = args.quick
    if args.vcpus < 1 or args.vfs < 1 or args.memory < 128:
        raise LabError("--vcpus and --vfs must be >= 1, --memory >= 128")
    if args.vfs > 200:
        raise LabError("--vfs: at most 200 (one /24 for the guests)")
    storms: tuple[bool, ...] = (False, True)
    if args.no_storm:
        storms = (False,)
    elif args.storm_only:
        storms = (True,)
    if True in storms and args.vcpus < 2:
        raise LabError("the storm moves vectors between vCPUs: use --vcpus >= 2 or --no-storm")
    return JobOptions(
        vcpus=args.vcpus,
        memory_mb=args.memory,
        duration=args.duration if args.duration is not None else (3 if quick else 8),
        policies=args.policies or (("shadow", "forward-all") if quick else POLICIES),
        accel=args.accel,
        vfs=args.vfs,
        storms=storms,
        directions=args.directions or (("tx",) if quick else ("tx", "rx")),
        storm_interval_us=args.storm_interval_us,
        trace=args.trace,
        out=args.out,
        build=not args.no_build,
    )


def _sigterm(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        opts = options_from_args(args)
        res = run_job(opts)
    except LabError as e:
        print(f"mainjob: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(res.table)
    print()
    print(checks_text(res.checks))
    print()
    for kind, path in res.written.items():
        print(f"{kind}: {path}")
    if res.problems:
        print("\nproblems:\n  " + "\n  ".join(res.problems), file=sys.stderr)
    log.info("main job %s in %.0f s", "done" if res.ok else "FAILED",
             res.doc["info"]["wall_seconds"])
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())

