"""``vmsi-ctl``: read a running server's counters through its control socket."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from vmsi_server.telemetry.control import query


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmsi-ctl", description=__doc__)
    parser.add_argument("--control-socket", required=True, help="the server's --control-socket")
    parser.add_argument("command", nargs="?", default="counters", choices=["counters", "ping"])
    parser.add_argument("--json", action="store_true", help="print the raw JSON document")
    args = parser.parse_args(argv)
    try:
        doc = query(args.control_socket, args.command)
    except OSError as exc:
        print(f"vmsi-ctl: cannot reach {args.control_socket}: {exc}", file=sys.stderr)
        return 1
    if args.json or args.command != "counters":
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render(doc))
    return 0


def render(doc: dict[str, Any]) -> str:
    """A terminal summary: messages per command, MSI-X paths, CPU."""
    lines = [f"policy: {doc.get('policy')}"]
    cpu = doc.get("cpu", {})
    lines.append(
        f"cpu: io process {cpu.get('io_process_seconds', 0):.2f} s, "
        f"slow path {_fmt(cpu.get('slowpath_seconds'))} s"
    )
    for name, dev in sorted(doc.get("devices", {}).items()):
        state = "connected" if dev.get("connected") else "idle"
        lines.append(f"{name} ({dev.get('mac')}, {state}, sessions {dev.get('sessions_served')})")
        for command, stat in sorted(dev.get("messages", {}).items()):
            lines.append(
                f"  {command:<24} {stat.get('count', 0):>10}  errors {stat.get('errors', 0):>5}"
                f"  mean {_fmt(stat.get('mean_us'))} us"
            )
        for access in dev.get("msix", {}).get("accesses", []):
            if access.get("count"):
                lines.append(
                    f"  msix {access['region']}/{access['kind']} [{access['path']}]"
                    f" {access['count']}"
                )
        nic = dev.get("nic", {})
        if nic:
            lines.append("  nic " + " ".join(f"{k}={v}" for k, v in sorted(nic.items())))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
