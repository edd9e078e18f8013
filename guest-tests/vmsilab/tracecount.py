"""Count QEMU trace events while QEMU writes them, by time, without keeping the log.

QEMU's ``log`` trace backend writes one line per event to the ``-D`` file. With
``-msg timestamp=on`` each line starts with an ISO-8601 UTC wall-clock stamp::

    2026-11-29T01:08:52.235535Z memory_region_ops_read cpu 0 mr 0x55.. addr 0xfe00400c
        value 0x1 size 4 name 'msix-table'

``memory_region_ops_*`` logs *every* MMIO and port access (a TCG boot alone is
~200,000 lines, mostly VGA, HPET and PCI config ports; guest-lab.md §9). So the
``-D`` file here is a FIFO: a reader thread classifies each line as it arrives,
adds it to a per-key, per-time-bin count, writes the few lines that matter
(MSI-X, SET_IRQS, config writes) to a small filtered log, and drops the rest.
Nothing of the volume reaches the disk; QEMU still pays for formatting every
line (the main job measures that cost: ``--no-mmio-trace``).

Counts are kept per ``BIN_SECONDS`` of the line's own timestamp, so a window
``[t0, t1)`` taken on the host clock (``time.time()``) selects the events QEMU
logged in it, regardless of pipe buffering.

Keys (``classify``):

=====================================  ==============================================
``mmio.msix-table.read`` / ``.write``   guest access to QEMU's emulated MSI-X table
``mmio.vfio-pba.read`` / ``.write``     the vfio-user PBA overlay (``VFIO MSIX PBA``):
                                        each read is a REGION_READ to the server
``mmio.msix-pba.read`` / ``.write``     QEMU's own PBA (hidden under vfio-user)
``mmio.vfio-bar.read`` / ``.write``     the device's BARs served by the server
``mmio.other``                          every other region (counted, not kept)
``msix.vector_use`` / ``_release``      vfio_msix_vector_do_use / _release
``msix.enable`` / ``msix.disable``      vfio_msix_enable / _disable
``msix.write_config``                   msix_write_config (Message Control seen)
``vfio.msi_interrupt``                  an interrupt QEMU took from the eventfd
``pci.write_config``                    guest config write (vfio_pci_write_config)
``pci.write_config.msix``               ... inside the MSI-X capability
``vfio_user.set_irqs``                  one SET_IRQS message sent
``vfio_user.region_rw``                 one REGION_READ/REGION_WRITE message sent
``vfio_user.region_rw.config``          ... of them to the config region (7)
``vfio_user.wrmulti_flush`` / ``_add``  REGION_WRITE_MULTI sent / write batched
``vfio_user.<other>``                   dma_map, dma_unmap, version, get_info, ...
=====================================  ==============================================
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger("vmsilab")

BIN_SECONDS = 0.05

#: Events that are cheap (hundreds to a few thousand per second at most).
NARROW_EVENTS: tuple[str, ...] = (
    "vfio_msix_vector_do_use",
    "vfio_msix_vector_release",
    "vfio_msix_enable",
    "vfio_msix_disable",
    "vfio_msi_interrupt",
    "msix_write_config",
    "vfio_pci_write_config",
    "vfio_user_set_irqs",
    "vfio_user_region_rw",
    "vfio_user_wrmulti",
    "vfio_user_dma_map",
    "vfio_user_dma_unmap",
    "vfio_user_version",
    "vfio_user_get_info",
    "vfio_user_get_region_info",
    "vfio_user_get_irq_info",
)
#: Every MMIO/PIO dispatch: the only way to see MSI-X table accesses, and heavy.
MMIO_EVENTS: tuple[str, ...] = ("memory_region_ops_read", "memory_region_ops_write")

#: igbvf's MSI-X capability: config offset 0x70, 12 bytes (reference/igbvf.md).
MSIX_CAP = (0x70, 0x7C)

_MMIO_NAMES = {
    "msix-table": "mmio.msix-table",
    "VFIO MSIX PBA": "mmio.vfio-pba",
    "msix-pba": "mmio.msix-pba",
}
_SIMPLE = {
    "vfio_msix_vector_do_use": "msix.vector_use",
    "vfio_msix_vector_release": "msix.vector_release",
    "vfio_msix_enable": "msix.enable",
    "vfio_msix_disable": "msix.disable",
    "msix_write_config": "msix.write_config",
    "vfio_msi_interrupt": "vfio.msi_interrupt",
    "vfio_user_set_irqs": "vfio_user.set_irqs",
}
#: Keys whose lines go to the filtered log (low volume, worth reading later).
_KEEP_PREFIXES = ("mmio.msix", "mmio.vfio-pba", "msix.", "pci.write_config.msix", "vfio_user.set")
_WCFG_RE = re.compile(r"@0x([0-9a-fA-F]+)")
_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\d)T(\d\d):(\d\d):(\d\d(?:\.\d+)?)Z$")
_PIDTS_RE = re.compile(r"^\d+@(\d+)\.(\d+):(.*)$")


class _DayCache:
    """Seconds since the epoch of a date string, computed once per day seen."""

    def __init__(self) -> None:
        self._days: dict[str, int] = {}

    def epoch(self, day: str) -> int:
        v = self._days.get(day)
        if v is None:
            y, m, d = (int(x) for x in day.split("-"))
            v = self._days[day] = calendar.timegm((y, m, d, 0, 0, 0))
        return v


def split_line(line: str, days: _DayCache | None = None) -> tuple[float | None, str, str]:
    """(timestamp or None, event name, rest) of one log-backend line."""
    days = days or _DayCache()
    head, _, rest = line.partition(" ")
    m = _TS_RE.match(head)
    if m:
        day, hh, mm, ss = m.groups()
        ts = days.epoch(day) + int(hh) * 3600 + int(mm) * 60 + float(ss)
        event, _, rest = rest.lstrip(" ").partition(" ")
        return ts, event, rest
    m2 = _PIDTS_RE.match(head)
    if m2:  # older QEMU: "pid@sec.usec:event"
        return float(f"{m2.group(1)}.{m2.group(2)}"), m2.group(3), rest
    return None, head, rest


def classify(event: str, rest: str, msix_cap: tuple[int, int] = MSIX_CAP) -> list[str]:
    """Counter keys for one event (usually one, two for sub-counted events)."""
    if event.startswith("memory_region_ops_"):
        kind = "read" if event.endswith("read") else "write"
        i = rest.rfind("name '")
        name = rest[i + 6 : rest.rfind("'")] if i >= 0 else ""
        key = _MMIO_NAMES.get(name)
        if key is not None:
            return [f"{key}.{kind}"]
        if name.startswith("vfio-user:"):
            return [f"mmio.vfio-bar.{kind}"]
        return ["mmio.other"]
    simple = _SIMPLE.get(event)
    if simple is not None:
        return [simple]
    if event == "vfio_user_region_rw":
        fields = rest.split()
        if len(fields) >= 2 and fields[0] == "region" and fields[1] == "7":
            return ["vfio_user.region_rw", "vfio_user.region_rw.config"]
        return ["vfio_user.region_rw"]
    if event == "vfio_user_wrmulti":
        return ["vfio_user.wrmulti_flush" if "flush" in rest else "vfio_user.wrmulti_add"]
    if event == "vfio_pci_write_config":
        m = _WCFG_RE.search(rest)
        if m and msix_cap[0] <= int(m.group(1), 16) < msix_cap[1]:
            return ["pci.write_config", "pci.write_config.msix"]
        return ["pci.write_config"]
    if event.startswith("vfio_user_"):
        return ["vfio_user." + event[len("vfio_user_") :]]
    return ["other." + event] if event else []


class TraceCounts:
    """Per-key counts in time bins: one writer thread, readers copy (atomic under the GIL)."""

    def __init__(self, bin_seconds: float = BIN_SECONDS) -> None:
        self.bin_seconds = bin_seconds
        self._bins: Counter[tuple[str, int]] = Counter()
        self.totals: Counter[str] = Counter()
        self.lines = 0
        self.untimed = 0
        self.first_ts: float | None = None
        self.last_ts: float | None = None

    def add(self, ts: float | None, keys: Iterable[str]) -> None:
        self.lines += 1
        if ts is None:
            self.untimed += 1
            for k in keys:
                self.totals[k] += 1
            return
        if self.first_ts is None:
            self.first_ts = ts
        self.last_ts = ts
        b = int(ts / self.bin_seconds)
        for k in keys:
            self.totals[k] += 1
            self._bins[(k, b)] += 1

    def window(self, t0: float, t1: float) -> dict[str, int]:
        """Counts of events stamped in [t0, t1) (host wall clock, bin resolution)."""
        b0, b1 = int(t0 / self.bin_seconds), int(t1 / self.bin_seconds)
        out: Counter[str] = Counter()
        items = list(self._bins.items())  # one C-level copy: atomic under the GIL
        for (k, b), n in items:
            if b0 <= b < b1:
                out[k] += n
        return dict(out)

    def total(self) -> dict[str, int]:
        return dict(self.totals)

    def feed(self, lines: Iterable[str], keep: IO[str] | None = None) -> None:
        """Classify and count lines (the reader thread's loop: kept lean on purpose)."""
        days = _DayCache()
        bins, totals, width = self._bins, self.totals, self.bin_seconds
        day_key, day_epoch = "", 0
        n = 0
        for line in lines:
            n += 1
            # Fast path: "YYYY-MM-DDTHH:MM:SS.ffffffZ event rest" (-msg timestamp=on).
            if line[26:28] == "Z " and line[10:11] == "T":
                if line[:10] != day_key:
                    day_key, day_epoch = line[:10], days.epoch(line[:10])
                try:
                    ts: float | None = (
                        day_epoch + int(line[11:13]) * 3600 + int(line[14:16]) * 60
                        + float(line[17:26])
                    )
                except ValueError:
                    ts, event, rest = split_line(line.rstrip("\n"), days)
                else:
                    sp = line.find(" ", 28)
                    if sp < 0:
                        event, rest = line[28:].rstrip("\n"), ""
                    else:
                        event, rest = line[28:sp], line[sp + 1 :].rstrip("\n")
            else:
                ts, event, rest = split_line(line.rstrip("\n"), days)
            keys = classify(event, rest)
            if ts is None:
                self.untimed += 1
                for k in keys:
                    totals[k] += 1
            else:
                if self.first_ts is None:
                    self.first_ts = ts
                self.last_ts = ts
                b = int(ts / width)
                for k in keys:
                    totals[k] += 1
                    bins[(k, b)] += 1
            if keep is not None and keys and keys[0].startswith(_KEEP_PREFIXES):
                keep.write(line if line.endswith("\n") else line + "\n")
        self.lines += n


class TraceStream:
    """A FIFO for QEMU's ``-D`` and a thread counting what QEMU writes into it.

    Create before QEMU starts (``start()``), hand ``fifo`` to QEMU as ``-D``, and
    ``close()`` after QEMU has exited (EOF ends the thread). ``kept`` receives the
    lines worth reading (MSI-X, SET_IRQS, config writes).
    """

    def __init__(self, fifo: Path, kept: Path | None = None) -> None:
        self.fifo = fifo
        self.kept = kept
        self.counts = TraceCounts()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._opened = threading.Event()
        self.busy_seconds = 0.0  # reader thread CPU (its own cost, not QEMU's)

    @staticmethod
    def qemu_args(events: Sequence[str], inner_path: str) -> list[str]:
        """``-trace`` per event, timestamps on, log to ``inner_path`` (QEMU's view)."""
        args: list[str] = []
        for e in events:
            args += ["-trace", e]
        return [*args, "-D", inner_path, "-msg", "timestamp=on"]

    def start(self) -> TraceStream:
        self.fifo.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.fifo.unlink()
        os.mkfifo(self.fifo, 0o600)
        self._thread = threading.Thread(target=self._run, name="trace-reader", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.thread_time()
        try:
            with self.fifo.open("r", encoding="utf-8", errors="replace", buffering=1 << 20) as f:
                self._opened.set()
                if self.kept is not None:
                    with self.kept.open("w") as keep:
                        self.counts.feed(f, keep)
                else:
                    self.counts.feed(f)
        except BaseException as e:  # reported by close()
            self.error = e
        finally:
            self.busy_seconds = time.thread_time() - t0

    def close(self, timeout: float = 30.0) -> None:
        """Wait for EOF (QEMU gone). If QEMU never opened the FIFO, unblock the reader."""
        t = self._thread
        if t is None:
            return
        if not self._opened.is_set():
            try:  # a writer that opens and closes gives the blocked reader its EOF
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
        t.join(timeout)
        if t.is_alive():
            log.warning("trace reader still busy after %.0f s (a writer keeps %s open)",
                        timeout, self.fifo)
        self._thread = None
        with contextlib.suppress(FileNotFoundError):
            self.fifo.unlink()
        if self.error is not None:
            raise self.error
