"""``vmsi-server``: serve 82576 VFs over vfio-user.

Follows the vfio-user backend-program conventions: no daemonizing, stdio kept,
SIGTERM honoured, ``--socket-path`` or ``--fd`` (mutually exclusive). With
``--vfs N`` one PF with N VFs is served, one socket per VF, named from a
template (``{vf}`` is the VF index).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import structlog

from vmsi_server.msix.policy import PathPolicy
from vmsi_server.telemetry.logsetup import configure_logging

log = structlog.get_logger("vmsi.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmsi-server",
        description="vfio-user server exporting virtual Intel 82576 SR-IOV VFs (igbvf).",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--socket-path",
        help="UNIX socket to listen on; with --vfs > 1 a template containing {vf}",
    )
    where.add_argument("--fd", type=int, help="an already-bound listening UNIX socket (one VF)")
    parser.add_argument("--vfs", type=int, default=1, help="number of VFs of the PF (default 1)")
    parser.add_argument(
        "--tap",
        action="append",
        default=[],
        metavar="NAME",
        help="tap device for a VF (repeat per VF, or a template with {vf}); "
        "created if absent. Without it the VF has no network backend.",
    )
    parser.add_argument(
        "--mac",
        action="append",
        default=[],
        help="MAC address per VF (repeat per VF); default: a stable locally "
        "administered address derived from the VF index",
    )
    parser.add_argument(
        "--msix-policy",
        choices=[p.value for p in PathPolicy],
        default=PathPolicy.SHADOW.value,
        help="MSI-X path policy: shadow (the 2010 patch), legacy (before it), "
        "forward-all (every MSI-X event round-trips through the slow path)",
    )
    parser.add_argument(
        "--slowpath-timeout",
        type=float,
        default=1.0,
        help="seconds to wait for the slow-path process before counting an error",
    )
    parser.add_argument(
        "--no-slowpath",
        action="store_true",
        help="do not start the slow-path process (only valid with --msix-policy shadow)",
    )
    parser.add_argument(
        "--control-socket",
        help="UNIX socket answering counter queries (see `vmsi-ctl`)",
    )
    parser.add_argument(
        "--time-fast-path",
        action="store_true",
        help="also time fast-path MSI-X accesses (two clock reads each), so the "
        "counters hold latency histograms for both paths",
    )
    parser.add_argument(
        "--fast-lane",
        choices=["auto", "on", "off"],
        default="auto",
        help="the compiled fast lane (built by `make setup`): window reads, in-place "
        "writes and the tap packet loops in C; auto uses it when built, on requires "
        "it, off runs everything in Python",
    )
    parser.add_argument(
        "--backend",
        choices=["engine", "libvfio-user"],
        default="engine",
        help="protocol engine: the project's own (default) or libvfio-user via ctypes",
    )
    parser.add_argument(
        "--libvfio-user", metavar="PATH",
        help="path of libvfio-user.so for --backend libvfio-user (default: $LIBVFIO_USER_SO, "
        "then the dynamic linker's search path)",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)
    from vmsi_server.app import ServerConfig, run_server

    try:
        config = ServerConfig.from_args(args)
    except ValueError as exc:
        print(f"vmsi-server: {exc}", file=sys.stderr)
        return 2
    if config.backend == "libvfio-user":
        from bindings.libvfio_user import LibvfioUserError, load

        try:
            load(config.libvfio_user)
        except LibvfioUserError as exc:
            print(f"vmsi-server: {exc}", file=sys.stderr)
            return 2
    return run_server(config)


if __name__ == "__main__":
    sys.exit(main())
