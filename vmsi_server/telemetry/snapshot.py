"""One JSON-ready picture of a running server: messages, MSI-X paths, NIC, CPU."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from vmsi_server.telemetry.cpu import pid_exec_seconds, process_cpu_seconds
from vmsi_server.telemetry.summary import msix_totals

if TYPE_CHECKING:
    from vmsi_server.app import BuiltServer


def server_snapshot(built: BuiltServer) -> dict[str, Any]:
    devices: dict[str, Any] = {}
    for endpoint, vf in zip(built.server.endpoints, built.vfs, strict=True):
        session = endpoint.session
        devices[endpoint.name] = {
            "connected": session is not None,
            "sessions_served": endpoint.sessions_served,
            "clients_refused": endpoint.refused,
            "messages": endpoint.counters.snapshot(),
            "eventfd_swaps": session.irqs.swaps if session is not None else None,
            "fast_lane": _lane_stats(session),
            "msix": vf.counters.snapshot(),
            "nic": vf.stats.snapshot(),
            "mac": vf.pf.vf(vf.vf_index).mac.hex(":"),
        }
    slow = built.slow_path
    return {
        "policy": built.vfs[0].msix.policy.value if built.vfs else None,
        "fast_lane": built.server.loop.lanes is not None,
        "cpu": {
            "io_process_seconds": process_cpu_seconds(),
            "slowpath_seconds": slow.cpu_seconds() if slow is not None else None,
            # Scheduler run time (ns precision) of the I/O process and of the live
            # slow-path worker: fine enough for windows of a few seconds.
            "io_process_exec_seconds": pid_exec_seconds(os.getpid()),
            "slowpath_exec_seconds": (
                pid_exec_seconds(slow.pid) if slow is not None and slow.pid else None
            ),
        },
        "slowpath": None
        if slow is None
        else {
            "pid": slow.pid,
            "restarts": slow.restarts,
            "timeouts": slow.timeouts,
            "errors": slow.errors,
            "counters": built.counters.snapshot(),
        },
        "devices": devices,
        # Every VF's MSI-X rows summed per operation and path (summary.py), so
        # "table reads forwarded under this policy" is one number.
        "msix_totals": msix_totals(devices.values()),
    }


def _lane_stats(session: object) -> dict[str, int] | None:
    """The compiled lane's share of this connection (engine sessions only)."""
    stats = getattr(session, "lane_stats", None)
    return stats() if callable(stats) else None
