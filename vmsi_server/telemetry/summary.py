"""MSI-X totals over every VF of a snapshot, and the difference of two snapshots.

Each VF keeps its own per-(region, kind, path) statistics. Experiments want
one figure per operation and path ("how many table reads were forwarded, in
all"), so ``msix_totals`` sums the VFs' rows into groups:

* ``table-read``: the ``msix-table`` read kinds (address/data, control, QWORD);
* ``table-write``: the ``msix-table`` write kinds;
* ``pba-read``, ``pba-write``;
* anything else as ``<region>/<kind>`` (Message Control, SET_IRQS actions,
  interrupt delivery).

Within a group there is one entry per path (``fast``, ``forward``,
``write-through``) with ``count``, ``errors`` and a merged latency histogram
(fast-path rows are timed only when the server runs with
``--time-fast-path``; otherwise their histogram is empty).

It works on the JSON snapshot (``snapshot.py``), so a client reading the
control socket computes the same totals the server exports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vmsi_server.telemetry.counters import Histogram

Totals = dict[str, dict[str, dict[str, Any]]]
"""group -> path -> {"count", "errors", "latency": Histogram}"""


def group_of(region: str, kind: str) -> str:
    if region in ("msix-table", "msix-pba"):
        op = "read" if kind.startswith("read") else "write" if kind.startswith("write") else kind
        return f"{region.removeprefix('msix-')}-{op}"
    return f"{region}/{kind}"


def msix_totals_raw(devices: Iterable[Mapping[str, Any]]) -> Totals:
    """Sum the ``msix`` access rows of device snapshots; histograms stay objects."""
    totals: Totals = {}
    for dev in devices:
        for row in dev.get("msix", {}).get("accesses", []):
            group = totals.setdefault(group_of(row["region"], row["kind"]), {})
            entry = group.setdefault(row["path"], {"count": 0, "errors": 0, "latency": Histogram()})
            entry["count"] += row.get("count", 0)
            entry["errors"] += row.get("errors", 0)
            entry["latency"].merge(Histogram.from_snapshot(row.get("latency", {})))
    return totals


def msix_totals(devices: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """JSON-ready totals, plus ``forwarded_table_reads`` and ``fast_table_reads``."""
    return export(msix_totals_raw(devices))


def totals_of_snapshot(snapshot: Mapping[str, Any]) -> Totals:
    return msix_totals_raw(snapshot.get("devices", {}).values())


def difference(after: Totals, before: Totals) -> Totals:
    """What happened between two snapshots of the same server."""
    out: Totals = {}
    for group, paths in after.items():
        for path, entry in paths.items():
            old = before.get(group, {}).get(path)
            hist: Histogram = entry["latency"]
            out.setdefault(group, {})[path] = {
                "count": entry["count"] - (old["count"] if old else 0),
                "errors": entry["errors"] - (old["errors"] if old else 0),
                "latency": hist.minus(old["latency"]) if old else hist,
            }
    return out


def count(totals: Totals, group: str, path: str | None = None) -> int:
    """Accesses of ``group`` on ``path`` (all paths when None)."""
    paths = totals.get(group, {})
    if path is not None:
        entry = paths.get(path)
        return int(entry["count"]) if entry else 0
    return sum(int(e["count"]) for e in paths.values())


def latency(totals: Totals, group: str, path: str) -> Histogram:
    entry = totals.get(group, {}).get(path)
    return entry["latency"] if entry else Histogram()


def export(totals: Totals) -> dict[str, Any]:
    out: dict[str, Any] = {
        group: {
            path: {
                "count": e["count"],
                "errors": e["errors"],
                "latency": e["latency"].snapshot(),
            }
            for path, e in sorted(paths.items())
        }
        for group, paths in sorted(totals.items())
    }
    out["forwarded_table_reads"] = count(totals, "table-read", "forward")
    out["fast_table_reads"] = count(totals, "table-read", "fast")
    return out
