"""``python -m vmsi_server.replay``: N simulated guests against a running vmsi-server.

Start the server with one VF per guest, e.g.::

    vmsi-server --socket-path /tmp/vmsi/vf{vf}.sock --vfs 24 \\
        --msix-policy legacy --control-socket /tmp/vmsi/ctl
    python -m vmsi_server.replay --socket-path /tmp/vmsi/vf{vf}.sock --guests 24 \\
        --rate 200 --contention 0.5 --duration 10 --control-socket /tmp/vmsi/ctl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from vmsi_server.replay.model import GuestKernel, LoadModel, socket_paths
from vmsi_server.replay.runner import ReplayRun
from vmsi_server.telemetry import summary
from vmsi_server.telemetry.control import query


def build_parser() -> argparse.ArgumentParser:
    d = LoadModel()
    p = argparse.ArgumentParser(
        prog="python -m vmsi_server.replay",
        description="Simulated guests (one vfio-user client per VF) that mask, flush and "
        "unmask MSI-X vectors the way Linux does, reacting to real interrupts.",
    )
    p.add_argument("--socket-path", required=True,
                   help="the server's socket template, e.g. /tmp/vmsi/vf{vf}.sock")
    p.add_argument("--guests", type=int, default=d.guests, help=f"default {d.guests}")
    p.add_argument("--first-vf", type=int, default=0, help="VF index of the first guest")
    p.add_argument("--rate", type=float, default=d.rate,
                   help=f"interrupts per second per guest (default {d.rate:g})")
    p.add_argument("--contention", type=float, default=d.contention,
                   help="share of interrupts that hit contention: mask, flush read, unmask "
                   f"(default {d.contention:g})")
    p.add_argument("--affinity-rate", type=float, default=d.affinity_rate,
                   help=f"affinity moves per second per guest (default {d.affinity_rate:g})")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds")
    p.add_argument("--kernel", choices=[k.value for k in GuestKernel], default=d.kernel.value,
                   help="guest kernel's MSI-X pattern (linux-2.6 also flushes on unmask and "
                   "reads the message back on affinity moves)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="load-generator processes (default 1)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    p.add_argument("--control-socket",
                   help="the server's control socket: also print its MSI-X counters' deltas")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def model_from_args(args: argparse.Namespace) -> LoadModel:
    return LoadModel(
        guests=args.guests,
        rate=args.rate,
        contention=args.contention,
        affinity_rate=args.affinity_rate,
        duration=args.duration,
        kernel=GuestKernel(args.kernel),
        seed=args.seed,
        workers=args.workers,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = model_from_args(args)
        paths = socket_paths(args.socket_path, model.guests, args.first_vf)
    except ValueError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    server: dict[str, Any] | None = None
    with ReplayRun(model, paths, timeout=args.timeout) as replay:
        before = query(args.control_socket) if args.control_socket else None
        stats = replay.run()
        if before is not None:
            after = query(args.control_socket)
            delta = summary.difference(
                summary.totals_of_snapshot(after), summary.totals_of_snapshot(before)
            )
            server = {
                "forwarded_table_reads": summary.count(delta, "table-read", "forward"),
                "fast_table_reads": summary.count(delta, "table-read", "fast"),
                "table_writes": summary.count(delta, "table-write"),
            }
        late = replay.late
    doc = stats.summary()
    doc["late_events"] = late
    if server is not None:
        doc["server"] = server
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render(doc))
    return 1 if stats.errors else 0


def render(doc: dict[str, Any]) -> str:
    lat = doc["read_latency_us"]
    lines = [
        f"guests {doc['guests']}, {doc['seconds']:.2f} s: interrupts raised {doc['raised']}, "
        f"handled {doc['handled']} ({doc['handled_per_second']:.0f}/s), "
        f"contended {doc['contended']}, affinity moves {doc['affinity_moves']}",
        f"table reads {doc['table_reads']} (flush {doc['flush_reads']}), "
        f"table writes {doc['table_writes']}, register writes {doc['register_writes']}",
        f"table read latency (client): p50 {lat['p50']} us, p99 {lat['p99']} us, "
        f"max {lat['max']} us",
        f"load generator CPU {doc['load_cpu_seconds']:.2f} s "
        f"(not server CPU), late events {doc['late_events']}",
        f"errors {doc['errors']}",
    ]
    lines += [f"  {m}" for m in doc["error_messages"]]
    if "server" in doc:
        s = doc["server"]
        lines.append(
            f"server: table reads forwarded {s['forwarded_table_reads']}, "
            f"fast {s['fast_table_reads']}; table writes {s['table_writes']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
