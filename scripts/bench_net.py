"""iperf3 through the server's 82576 VF against QEMU's built-in e1000e, same run.

    python -m scripts.bench_net [--rounds 2] [--seconds 10] [--json] [--profile DIR]

Both NICs run the same guest image (vmsilab's initramfs, igbvf or e1000e bound
by the stock kernel) against the same peer: a tap in a private netns with
``iperf3 -s``. The NICs alternate (VF, e1000e, VF, e1000e, ...) so that drift in
the machine's load hits both alike. Each boot runs ``iperf3 -c PEER -t SECONDS``
(guest -> peer) and then the same with ``-R`` (peer -> guest). Printed: Gbit/s
per run, the mean per NIC and direction, and the VF/e1000e ratio per direction.

``--profile DIR`` samples the server process with py-spy (``pip install
py-spy``) during each VF iperf3 run, one collapsed-stack file per round and
direction (``vf-r<round>-fwd.txt``), and prints the hottest frames.
Under TCG the guest's CPU, not the NIC, sets the numbers (guest-lab.md §5).

``--pin split`` (the default) runs iperf3 on vCPU 0 and every eth0 vector on
vCPU 1 in both guests; ``--pin same`` puts both on vCPU 0, ``--pin none``
leaves placement to the guest (it then varies per boot, and with it the
throughput, by up to 2x). Each run prints where the NIC's interrupts landed.
Needs root and the built lab (``python -m vmsilab build``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GUEST_TESTS = REPO / "guest-tests"
for _p in (REPO, GUEST_TESTS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from vmsilab.build import build  # noqa: E402
from vmsilab.config import LabConfig, LabError  # noqa: E402
from vmsilab.guest import CMD_RE, NO_NIC, POWEROFF_RE, RC_RE, Guest, tap_nic  # noqa: E402
from vmsilab.iperf import (  # noqa: E402
    iperf_json,
    iperf_run_script,
    link_wait_script,
    marker_value,
    summarize,
)
from vmsilab.netns import GUEST_ADDR, NetNs  # noqa: E402
from vmsilab.progress import setup_logging  # noqa: E402
from vmsilab.vfserver import VfServer  # noqa: E402

DIRECTIONS = (("fwd", False), ("rev", True))
"""(tag, iperf3 -R): fwd is guest -> peer (the NIC's TX), rev peer -> guest (RX)."""
NICS = ("vf", "e1000e")


@dataclass
class Run:
    nic: str
    round: int
    boot_s: float
    gbps: dict[str, float] = field(default_factory=dict)
    retransmits: dict[str, int | None] = field(default_factory=dict)
    server_cpu_s: float | None = None
    server_nic: dict[str, int] | None = None
    per_direction: dict[str, dict[str, float]] = field(default_factory=dict)
    """VF only: per-second rates of the server's counters during each iperf3 run
    (server_cpu_pct, REGION_WRITE, irq.sent.N, gptc, gprc, tx_tso_frames, ...)."""
    per_second: dict[str, list[float]] = field(default_factory=dict)
    """iperf3's one-second intervals, Gbit/s: a stall and a steady slow rate look
    alike in the mean."""
    nic_irqs: list[str] = field(default_factory=list)
    """The guest's /proc/interrupts lines of eth0 after the runs (where they landed)."""
    error: str | None = None


@dataclass(frozen=True)
class Plan:
    """What every guest of the run does: seconds per direction, offloads, placement."""

    seconds: int
    offloads: bool
    pin: str


PIN_CHOICES = ("split", "same", "none")
"""Where iperf3 and the NIC's interrupts run in the 2-vCPU guest (the same for both NICs):
``split`` iperf3 on vCPU 0, every eth0 vector on vCPU 1 (the default); ``same`` both on
vCPU 0; ``none`` wherever the guest's scheduler and vector allocator put them."""


def pin_script(pin: str) -> tuple[str, str]:
    """(guest commands that place the NIC's vectors, iperf3's -A option) for ``pin``.

    Why pin: with two vCPUs, whether the iperf3 thread shares a vCPU with the NIC's
    interrupt handlers is decided per boot by the guest and halves or doubles
    guest -> peer throughput; unpinned, that coin toss swamps a NIC-to-NIC ratio."""
    if pin == "none":
        return "", ""
    mask = 2 if pin == "split" else 1
    return (f"for q in $(grep eth0 /proc/interrupts | cut -d: -f1); do "
            f"echo {mask} > /proc/irq/$q/smp_affinity; done\n"), " -A 0"


def guest_script(peer: str, seconds: int, offloads: bool, pin: str = "split") -> str:
    script = link_wait_script("eth0", GUEST_ADDR)
    if not offloads:
        script += "ethtool -K eth0 tso off tx off sg off rx off\n"
    place, affinity = pin_script(pin)
    script += place
    script += "ping -c 1 -W 2 " + peer + " >/dev/null; sleep 0.5\n"
    for tag, reverse in DIRECTIONS:
        script += f"echo BENCH_BEGIN_{tag}\n"
        script += iperf_run_script(peer, seconds, reverse=reverse, tag=tag.upper(),
                                   extra=affinity)
    script += "grep eth0 /proc/interrupts | sed 's/^/NIC_IRQS /'\n"
    return script


class Profiler:
    """py-spy record of one process for a fixed time, collapsed stacks to a file."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self.exe = shutil.which("py-spy")
        if out_dir is not None:
            if self.exe is None:
                raise LabError("--profile needs py-spy (pip install py-spy)")
            out_dir.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []

    def start(self, pid: int, name: str, seconds: int) -> subprocess.Popen[bytes] | None:
        if self.out_dir is None or self.exe is None:
            return None
        out = self.out_dir / f"{name}.txt"
        self.files.append(out)
        return subprocess.Popen(
            [self.exe, "record", "-p", str(pid), "-d", str(seconds), "-r", "250",
             "--nonblocking", "-f", "raw", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )


class Hooks:
    """Called at the start and end of each direction's iperf3 run (VF: counters and
    the profiler; e1000e: nothing)."""

    def begin(self, tag: str) -> None: ...

    def end(self, tag: str) -> None: ...


def _run_guest(cfg: LabConfig, ns: NetNs, guest: Guest, run: Run, plan: Plan,
               hooks: Hooks | None = None) -> None:
    hooks = hooks or Hooks()
    seconds = plan.seconds
    guest.boot(script=guest_script(ns.peer_ip, seconds, plan.offloads, plan.pin))
    run.boot_s, _ = guest.wait_ready()
    guest.wait_for(CMD_RE, 30)
    start = guest.cursor
    for tag, _ in DIRECTIONS:
        guest.wait_for(f"BENCH_BEGIN_{tag}", 60)
        hooks.begin(tag)
        guest.wait_for(f"IPERF_{tag.upper()}_RC=", seconds + 60)
        hooks.end(tag)
    m_rc = guest.wait_for(RC_RE, 60)
    out = guest.text(start, m_rc.start())
    guest.wait_for(POWEROFF_RE, 30)
    if marker_value(out, "LINK_CARRIER") != "1":
        run.error = "no carrier"
    run.nic_irqs = [" ".join(line.split()[1:]) for line in out.splitlines()
                    if line.startswith("NIC_IRQS ")]
    for tag, _ in DIRECTIONS:
        try:
            doc = iperf_json(out, tag.upper())
            s = summarize(doc)
        except (ValueError, KeyError) as e:
            run.error = f"{tag}: {e}"
            continue
        run.per_second[tag] = [round(i["sum"]["bits_per_second"] / 1e9, 3)
                               for i in doc.get("intervals", [])]
        run.gbps[tag] = s.received_bps / 1e9
        run.retransmits[tag] = s.retransmits


def _flat(snap: dict[str, Any]) -> dict[str, float]:
    """The counters a direction's delta is taken of: server CPU, messages, NIC."""
    dev = snap["devices"]["vf0"]
    out = {"server_cpu_s": float(snap["cpu"]["io_process_seconds"])}
    for cmd in ("REGION_WRITE", "REGION_READ"):
        out[cmd] = float(dev["messages"].get(cmd, {}).get("count", 0))
    out.update({k: float(v) for k, v in dev["nic"].items() if not k.startswith("drop.")})
    lane = dev.get("fast_lane") or {}
    for key in ("device_writes", "posted_to_python"):
        out[f"lane.{key}"] = float(lane.get(key, 0))
    return out


class VfHooks(Hooks):
    def __init__(self, server: VfServer, prof: Profiler, rnd: int, seconds: int,
                 run: Run) -> None:
        assert server.proc is not None
        self.server, self.prof, self.rnd, self.seconds, self.run = (
            server, prof, rnd, seconds, run)
        self.pid = server.proc.pid
        self.t0 = 0.0
        self.before: dict[str, float] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def begin(self, tag: str) -> None:
        self.before = _flat(self.server.counters())
        self.t0 = time.monotonic()
        self.proc = self.prof.start(self.pid, f"vf-r{self.rnd}-{tag}", self.seconds)

    def end(self, tag: str) -> None:
        elapsed = time.monotonic() - self.t0
        after = _flat(self.server.counters())
        rates = {k: (after[k] - self.before.get(k, 0.0)) / elapsed for k in after}
        rates["server_cpu_pct"] = rates.pop("server_cpu_s") * 100
        self.run.per_direction[tag] = {k: round(v, 1) for k, v in rates.items() if v}
        if self.proc is not None:
            self.proc.wait(self.seconds + 30)


def run_vf(cfg: LabConfig, rnd: int, plan: Plan, prof: Profiler) -> Run:
    run = Run("vf", rnd, 0.0)
    with NetNs(cfg, tap=None) as ns, VfServer(cfg, ns, log_name=f"server-{rnd}.log") as server:
        ns.start_iperf3()
        cpu0 = server.counters()["cpu"]["io_process_seconds"]
        with Guest(cfg, netns=ns, name="bench-vf", nic=NO_NIC,
                   devices=[server.device_arg(0)]) as guest:
            _run_guest(cfg, ns, guest, run, plan,
                       VfHooks(server, prof, rnd, plan.seconds, run))
        snap = server.counters()
        run.server_cpu_s = snap["cpu"]["io_process_seconds"] - cpu0
        run.server_nic = snap["devices"]["vf0"]["nic"]
        if server.stop() != 0:
            run.error = (run.error or "") + f" server rc {server.returncode}"
    return run


def run_e1000e(cfg: LabConfig, rnd: int, plan: Plan) -> Run:
    run = Run("e1000e", rnd, 0.0)
    with (
        NetNs(cfg, tap="tap0", iperf3_server=True) as ns,
        Guest(cfg, netns=ns, name="bench-e1000e", nic=tap_nic("tap0", "e1000e")) as guest,
    ):
        _run_guest(cfg, ns, guest, run, plan)
    return run


def summarize_runs(runs: list[Run]) -> dict[str, Any]:
    means: dict[str, dict[str, float | None]] = {}
    for nic in NICS:
        means[nic] = {}
        for tag, _ in DIRECTIONS:
            vals = [r.gbps[tag] for r in runs if r.nic == nic and tag in r.gbps]
            means[nic][tag] = statistics.mean(vals) if vals else None
    ratios: dict[str, float | None] = {}
    for tag, _ in DIRECTIONS:
        vf, e = means["vf"][tag], means["e1000e"][tag]
        ratios[tag] = vf / e if vf is not None and e else None
    return {"mean_gbps": means, "ratio_vf_over_e1000e": ratios}


def hottest(files: list[Path], top: int = 25) -> list[tuple[str, float]]:
    """Self time per frame (leaf of each collapsed stack), as a share of samples."""
    leaf: Counter[str] = Counter()
    total = 0
    for f in files:
        if not f.exists():
            continue
        for line in f.read_text(errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            frames = stack.split(";")
            leaf[frames[-1]] += int(n)
            total += int(n)
    return [(name, n / total) for name, n in leaf.most_common(top)] if total else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.bench_net", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--only", choices=NICS, help="run one NIC only (no ratio)")
    ap.add_argument("--offloads-off", action="store_true",
                    help="ethtool -K eth0 tso off tx off sg off rx off in the guest")
    ap.add_argument("--pin", choices=PIN_CHOICES, default="split",
                    help="guest placement of iperf3 and the NIC's vectors, the same for "
                         "both NICs (default split: iperf3 on vCPU 0, vectors on vCPU 1)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="py-spy the server during VF iperf3 runs, collapsed stacks here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    cfg = LabConfig.from_env()
    offloads = not args.offloads_off
    plan = Plan(args.seconds, offloads, args.pin)
    try:
        build(cfg)
        prof = Profiler(args.profile)
        runs: list[Run] = []
        for rnd in range(args.rounds):
            for nic in NICS:
                if args.only and nic != args.only:
                    continue
                t0 = time.monotonic()
                run = (run_vf(cfg, rnd, plan, prof) if nic == "vf"
                       else run_e1000e(cfg, rnd, plan))
                runs.append(run)
                if not args.json:
                    dirs = "  ".join(
                        f"{tag} {run.gbps.get(tag, float('nan')):.3f} Gbit/s"
                        f" (retr {run.retransmits.get(tag)})" for tag, _ in DIRECTIONS)
                    cpu = "".join(
                        f"  [{tag}: server {d.get('server_cpu_pct', 0):.0f}% CPU,"
                        f" {d.get('REGION_WRITE', 0):.0f} writes/s"
                        f" ({d.get('lane.posted_to_python', 0):.0f} in Python),"
                        f" irq tx/rx {d.get('irq.sent.0', 0):.0f}/{d.get('irq.sent.1', 0):.0f}/s]"
                        for tag, d in run.per_direction.items())
                    err = f"  ERROR {run.error}" if run.error else ""
                    print(f"round {rnd} {nic:7s} {dirs}{cpu}  "
                          f"[{time.monotonic() - t0:.0f} s]{err}", flush=True)
    except LabError as e:
        print(f"bench_net: {e}", file=sys.stderr)
        return 1
    summary = summarize_runs(runs)
    doc = {
        "seconds": args.seconds, "rounds": args.rounds, "offloads": offloads,
        "pin": args.pin,
        "runs": [asdict(r) for r in runs], **summary,
    }
    if args.profile is not None:
        doc["profile"] = {"files": [str(f) for f in prof.files],
                          "self_time": hottest(prof.files)}
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        means, ratios = summary["mean_gbps"], summary["ratio_vf_over_e1000e"]
        for tag, label in (("fwd", "guest -> peer"), ("rev", "peer -> guest")):
            vf, e1k = means["vf"][tag], means["e1000e"][tag]
            ratio = ratios[tag]
            print(f"{label}: VF {_fmt(vf)} Gbit/s, e1000e {_fmt(e1k)} Gbit/s, "
                  f"VF/e1000e {'n/a' if ratio is None else f'{ratio:.2f}x'}")
        if args.profile is not None:
            print("server self time (py-spy, VF runs):")
            for name, share in doc["profile"]["self_time"]:
                print(f"  {share * 100:5.1f}%  {name}")
    return 0 if all(r.error is None for r in runs) else 1


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
