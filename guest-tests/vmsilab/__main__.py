"""CLI: ``python -m vmsilab build|status|clean|e1000e-iperf|qemu-help``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from types import FrameType

from .config import LabConfig, LabError
from .progress import setup_logging


def _cmd_build(cfg: LabConfig, _args: argparse.Namespace) -> int:
    from .build import build

    t0 = time.monotonic()
    info = build(cfg)
    print(
        f"lab ready in {time.monotonic() - t0:.1f} s: QEMU {info.qemu_version}, "
        f"guest kernel {info.kernel_version}, lab dir {cfg.paths.root}"
    )
    return 0


def _cmd_status(cfg: LabConfig, _args: argparse.Namespace) -> int:
    from .maintenance import status

    print(json.dumps(status(cfg), indent=1))
    return 0


def _cmd_clean(cfg: LabConfig, args: argparse.Namespace) -> int:
    from .maintenance import clean

    for path in clean(cfg, runs_only=args.runs):
        print(f"removed {path}")
    return 0


def _cmd_qemu_help(cfg: LabConfig, args: argparse.Namespace) -> int:
    from .qemubuild import device_help

    print(device_help(cfg, args.device))
    return 0


def _cmd_nic_iperf(cfg: LabConfig, args: argparse.Namespace) -> int:
    from .build import build
    from .scenarios import qemu_nic_iperf

    build(cfg)
    run = qemu_nic_iperf(cfg, model=args.model, seconds=args.seconds, reverse=args.reverse)
    r = run.result
    print(
        f"accel {r.accel}; boot {r.boot_seconds:.1f} s (guest uptime {r.guest_uptime:.1f} s);"
        f" script {r.run_seconds:.1f} s, rc={r.rc}"
    )
    print(f"ping rc={run.ping_rc}; iperf3 rc={run.iperf_rc}")
    if run.iperf is None:
        print(r.output, file=sys.stderr)
        print(f"{args.model}: iperf3 produced no result", file=sys.stderr)
        return 1
    print(f"{args.model} guest -> netns peer: {run.iperf}")
    return 0 if r.rc == 0 and run.ping_rc == 0 else 1


def _sigterm(_sig: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM into KeyboardInterrupt so context managers unmount and clean up."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmsilab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build or reuse QEMU, guest kernel and initramfs")
    sub.add_parser("status", help="what is built, mounted and running")
    p = sub.add_parser("clean", help="unmount and delete the lab dir")
    p.add_argument("--runs", action="store_true", help="only delete run logs")
    p = sub.add_parser("qemu-help", help="QEMU -device help (default: vfio-user-pci)")
    p.add_argument("device", nargs="?", default="vfio-user-pci")
    p = sub.add_parser("e1000e-iperf", help="boot with QEMU's e1000e, iperf3 to the netns peer")
    p.add_argument("-t", "--seconds", type=int, default=5)
    p.add_argument("--model", default="e1000e", help="QEMU NIC model (e.g. virtio-net-pci)")
    p.add_argument("-R", "--reverse", action="store_true", help="peer sends to the guest")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    signal.signal(signal.SIGTERM, _sigterm)
    handlers = {
        "build": _cmd_build,
        "status": _cmd_status,
        "clean": _cmd_clean,
        "qemu-help": _cmd_qemu_help,
        "e1000e-iperf": _cmd_nic_iperf,
    }
    try:
        return handlers[args.cmd](LabConfig.from_env(), args)
    except LabError as e:
        print(f"vmsilab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
