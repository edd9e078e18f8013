"""``make bench-rtt``: synchronous REGION_READ round trips, vmsi-server against a C floor.

Every target is a program that serves vfio-user on a UNIX socket path; the same
client (:class:`~vmsi_server.client.client.VfioUserClient`, ``region_read(7, 0, 4)``:
4 bytes of config space) times ``--ops`` round trips against each of them. Targets:

``server``
    the real server, ``python -m vmsi_server --socket-path X --no-slowpath
    --fast-lane on``: config reads are answered by its compiled lane.
``server-python``
    the same server with ``--fast-lane off``: the pure Python path, for scale.
``echo``
    ``bench/echo_server.c``, compiled here with the system ``cc -O2`` into
    ``bench/bin/`` (gitignored). It makes the same system calls per message as
    the server (epoll_wait, recvmsg into 1 MiB with cmsg room, sendto), so its
    figure is the floor: kernel, context switches and the Python client.
``libvfio-user`` (``--also-libvfio-user``)
    placeholder column for the server running on libvfio-user; prints
    ``n/a (...)`` until that backend exists and the library is installed.

Rounds alternate between the targets (A B A B ...) so that machine noise hits all
of them alike; the table shows the median and the minimum over rounds, in µs per
round trip, and the ratio server / echo (the goal is <= 1.3). "target CPU µs/op"
is the target process's own on-CPU time per round trip (/proc/PID/schedstat,
kernel included): less sensitive to other load than the wall time, which a busy
machine inflates for every target alike. Timing is a property of the host (see
reference/guest-lab.md §6): same-CPU and cross-CPU round trips differ several-fold,
so by default the client and every target are pinned to one CPU (``--pin 0``);
``--pin none`` runs unpinned only and ``--also-unpinned`` adds an unpinned pass.

Adding a target: append a :class:`Target` to :func:`targets` (a name, a function
from socket path to argv, and an availability check).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmsi_server.client.client import VfioUserClient

REPO = Path(__file__).resolve().parent.parent
ECHO_SOURCE = REPO / "bench" / "echo_server.c"
DEFAULT_BUILD_DIR = REPO / "bench" / "bin"
REGION, OFFSET, COUNT = 7, 0, 4  # config space, vendor/device id dword
START_TIMEOUT = 20.0


@dataclass(frozen=True)
class Target:
    """A server program under test: ``command(socket_path)`` starts it listening there."""

    name: str
    command: Callable[[str], list[str]]
    unavailable: Callable[[], str | None] = lambda: None
    """None when the target can run, else why not (shown in its column)."""
    required: bool = True
    """A required target that fails to start stops the bench; another shows ``n/a``."""


def targets(echo_binary: Path, *, libvfio_user: bool) -> list[Target]:
    """The columns, in measurement order; the first is the one the ratio is about."""
    out = [
        Target("server", lambda path: [sys.executable, "-m", "vmsi_server", "--socket-path",
                                       path, "--no-slowpath", "--log-level", "warning",
                                       "--fast-lane", "on"]),
        Target("server-python", lambda path: [
            sys.executable, "-m", "vmsi_server", "--socket-path", path, "--no-slowpath",
            "--log-level", "warning", "--fast-lane", "off"]),
        Target("echo", lambda path: [str(echo_binary), path]),
    ]
    if libvfio_user:
        out.append(Target(
            "libvfio-user",
            lambda path: [sys.executable, "-m", "vmsi_server", "--socket-path", path,
                          "--no-slowpath", "--log-level", "warning",
                          "--backend", "libvfio-user"],
            _libvfio_user_missing,
            required=False,
        ))
    return out


def _libvfio_user_missing() -> str | None:
    """Why the libvfio-user column cannot run (the server's --backend loads the library)."""
    try:
        from bindings.libvfio_user import LibraryNotFound, LibvfioUserError, load
    except ImportError:
        found = ctypes.util.find_library("vfio-user")
        return "library not installed" if found is None else "bindings not available"
    try:
        load()
    except LibraryNotFound:
        return "library not installed"
    except LibvfioUserError as exc:
        return str(exc).split(". ")[0]
    return None


# ------------------------------------------------------------------------ build


def build_echo(build_dir: Path, cc: str = "cc") -> Path:
    """Compile the echo server (always: it takes a fraction of a second)."""
    if shutil.which(cc) is None:
        raise SystemExit(f"bench-rtt: no C compiler ({cc}) on PATH; install gcc")
    build_dir.mkdir(parents=True, exist_ok=True)
    binary = build_dir / "echo_server"
    partial = build_dir / f".echo_server.{os.getpid()}"
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(partial), str(ECHO_SOURCE)],
                   check=True)
    os.replace(partial, binary)  # atomic: a concurrent bench never runs a half-written file
    return binary


# ------------------------------------------------------------------------ processes


@dataclass
class Running:
    """A started target and the client connected to it."""

    target: Target
    proc: subprocess.Popen[bytes]
    client: VfioUserClient
    log_path: Path
    rounds_us: dict[str, list[float]] = field(default_factory=dict)
    cpu_rounds_us: dict[str, list[float]] = field(default_factory=dict)


def start(target: Target, workdir: Path) -> Running:
    sock = str(workdir / f"{target.name}.sock")
    log_path = workdir / f"{target.name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(target.command(sock), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{target.name} exited ({proc.returncode}):\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        if os.path.exists(sock):
            try:
                client = VfioUserClient(sock)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                pass
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{target.name} did not listen on {sock} in {START_TIMEOUT}s")
        time.sleep(0.02)
    reply = client.region_read(REGION, OFFSET, COUNT)
    if len(reply) != COUNT:
        raise RuntimeError(f"{target.name}: REGION_READ returned {len(reply)} bytes")
    return Running(target, proc, client, log_path)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (what ``taskset -a -p`` does)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)


# ------------------------------------------------------------------------ measuring


def cpu_ns(pid: int) -> int:
    """Time ``pid`` (its main thread) has spent on a CPU, in ns (/proc schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def time_ops(client: VfioUserClient, ops: int, pid: int) -> tuple[float, float]:
    """(wall µs, target CPU µs) per synchronous round trip over ``ops`` REGION_READs.

    The target's CPU time per op is less sensitive to other load on the machine
    than the wall time, and says how much of the round trip is the target's own.
    """
    read = client.region_read
    cpu_start = cpu_ns(pid)
    start_ns = time.perf_counter_ns()
    for _ in range(ops):
        read(REGION, OFFSET, COUNT)
    wall_ns = time.perf_counter_ns() - start_ns
    return wall_ns / ops / 1000, (cpu_ns(pid) - cpu_start) / ops / 1000


@dataclass(frozen=True)
class Regime:
    name: str
    cpus: set[int]


def measure(running: Sequence[Running], regime: Regime, ops: int, rounds: int,
            warmup: int) -> None:
    for r in running:
        set_affinity(r.proc.pid, regime.cpus)
    os.sched_setaffinity(0, regime.cpus)
    if warmup:
        for r in running:
            time_ops(r.client, warmup, r.proc.pid)
    for r in running:
        r.rounds_us[regime.name] = []
        r.cpu_rounds_us[regime.name] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the client allocates no cycles; keep its collector out of the timings
    try:
        for _ in range(rounds):
            for r in running:
                wall_us, cpu_us = time_ops(r.client, ops, r.proc.pid)
                r.rounds_us[regime.name].append(wall_us)
                r.cpu_rounds_us[regime.name].append(cpu_us)
    finally:
        if gc_was_enabled:
            gc.enable()


def summarize(all_targets: Sequence[Target], running: Sequence[Running],
              unavailable: dict[str, str], regime: Regime) -> dict[str, object]:
    by_name = {r.target.name: r for r in running}
    cols: dict[str, object] = {}
    for t in all_targets:
        if t.name in by_name:
            rounds_us = by_name[t.name].rounds_us[regime.name]
            cpu_us = by_name[t.name].cpu_rounds_us[regime.name]
            cols[t.name] = {
                "median_us": round(statistics.median(rounds_us), 3),
                "min_us": round(min(rounds_us), 3),
                "rounds_us": [round(x, 3) for x in rounds_us],
                "target_cpu_median_us": round(statistics.median(cpu_us), 3),
            }
        else:
            cols[t.name] = {"unavailable": unavailable[t.name]}
    out: dict[str, object] = {"regime": regime.name, "cpus": sorted(regime.cpus),
                              "targets": cols}
    server, echo = cols.get("server"), cols.get("echo")
    if isinstance(server, dict) and isinstance(echo, dict) and "median_us" in server \
            and "median_us" in echo:
        out["ratio_median"] = round(server["median_us"] / echo["median_us"], 3)
        out["ratio_min"] = round(server["min_us"] / echo["min_us"], 3)
    return out


def print_table(summary: dict[str, object], ops: int, rounds: int) -> None:
    cols = summary["targets"]
    assert isinstance(cols, dict)
    echo = cols.get("echo", {})
    print(f"\n{summary['regime']} (CPUs {summary['cpus']}): {ops} ops x {rounds} rounds")
    print(f"  {'target':<14}{'median µs/op':>14}{'min µs/op':>12}{'vs echo':>10}"
          f"{'target CPU µs/op':>18}")
    for name, col in cols.items():
        if "unavailable" in col:
            print(f"  {name:<14}  n/a ({col['unavailable']})")
            continue
        rel = (f"{col['median_us'] / echo['median_us']:.2f}x" if "median_us" in echo
               else "")
        print(f"  {name:<14}{col['median_us']:>14.2f}{col['min_us']:>12.2f}{rel:>10}"
              f"{col['target_cpu_median_us']:>18.2f}")
    if "ratio_median" in summary:
        print(f"  ratio server/echo: {summary['ratio_median']:.2f} (median), "
              f"{summary['ratio_min']:.2f} (min)")


# ------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_rtt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=20000, help="round trips per round (20000)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per target (5)")
    p.add_argument("--warmup", type=int, default=2000, help="untimed round trips first (2000)")
    p.add_argument("--pin", default="0", metavar="CPU|none",
                   help="pin client and targets to this one CPU (default 0); 'none': unpinned")
    p.add_argument("--also-unpinned", action="store_true",
                   help="after the pinned pass, measure again unpinned")
    p.add_argument("--also-libvfio-user", action="store_true",
                   help="add the libvfio-user backend column (n/a while not installed)")
    p.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR,
                   help="where the echo server is compiled (default bench/bin)")
    p.add_argument("--cc", default=os.environ.get("CC", "cc"), help="C compiler (cc)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = p.parse_args(argv)
    if args.ops < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--ops and --rounds must be positive, --warmup not negative")
    return args


def regimes(pin: str, also_unpinned: bool) -> list[Regime]:
    all_cpus = set(os.sched_getaffinity(0))
    out: list[Regime] = []
    if pin != "none":
        cpu = int(pin)
        if cpu not in all_cpus:
            raise SystemExit(f"bench-rtt: CPU {cpu} not available (have {sorted(all_cpus)})")
        out.append(Regime(f"pinned, all on CPU {cpu}", {cpu}))
    if pin == "none" or also_unpinned:
        out.append(Regime("unpinned", all_cpus))
    return out


@contextlib.contextmanager
def started(to_start: Sequence[Target], workdir: Path,
            unavailable: dict[str, str]) -> Iterator[list[Running]]:
    """Start every target; an optional one that fails goes into ``unavailable``."""
    running: list[Running] = []
    try:
        for t in to_start:
            try:
                running.append(start(t, workdir))
            except RuntimeError as exc:
                if t.required:
                    raise
                first = str(exc).splitlines()[0]
                unavailable[t.name] = f"did not start: {first}"
        yield running
    finally:
        for r in running:
            with contextlib.suppress(Exception):
                r.client.close()
            stop(r.proc)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = regimes(args.pin, args.also_unpinned)
    echo = build_echo(args.build_dir, args.cc)
    all_targets = targets(echo, libvfio_user=args.also_libvfio_user)
    unavailable = {t.name: why for t in all_targets if (why := t.unavailable()) is not None}
    runnable = [t for t in all_targets if t.name not in unavailable]
    original_affinity = os.sched_getaffinity(0)
    load = os.getloadavg()
    print(f"REGION_READ round trips (region {REGION}, offset {OFFSET}, {COUNT} bytes), "
          f"client: VfioUserClient, python {sys.version.split()[0]}; "
          f"load average {load[0]:.2f} on {os.cpu_count()} CPUs")
    summaries = []
    with tempfile.TemporaryDirectory(prefix="bench-rtt-") as tmp, \
            started(runnable, Path(tmp), unavailable) as running:
        try:
            for regime in plan:
                measure(running, regime, args.ops, args.rounds, args.warmup)
                summary = summarize(all_targets, running, unavailable, regime)
                print_table(summary, args.ops, args.rounds)
                summaries.append(summary)
        finally:
            os.sched_setaffinity(0, original_affinity)
    if args.json is not None:
        report = {"ops": args.ops, "rounds": args.rounds, "warmup": args.warmup,
                  "loadavg_at_start": load[0], "cpus": os.cpu_count(),
                  "region": REGION, "offset": OFFSET, "count": COUNT, "regimes": summaries}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
