"""Boot the lab guest in QEMU and talk to it through its serial log and QMP.

The guest's /init prints markers on ttyS0 (LAB_SHELL_READY, LAB_CMD:, LAB_CMD_RC=,
LAB_POWEROFF); QEMU writes the console to a file in the run dir and the host polls
it. ``-no-shutdown`` keeps QEMU (and QMP) alive after the guest powers off, so
counters can still be read; teardown then sends QMP ``quit`` and, failing that,
signals the process group. Paths handed to QEMU are as seen in the chroot (/lab/...).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .accel import Accel, detect_accel
from .config import LabConfig, LabError
from .initramfs import make_run_initrd
from .mounts import ChrootMounts
from .netns import GUEST_ADDR, NetNs
from .proc import file_tail, tail
from .qmp import Qmp, diff_stats

log = logging.getLogger("vmsilab")

READY_RE = rb"LAB_SHELL_READY uptime=([0-9.]+)"
CMD_RE = rb"LAB_CMD: [^\n]*\n"
RC_RE = rb"LAB_CMD_RC=(\d+)"
POWEROFF_RE = rb"LAB_POWEROFF"
NO_NIC: tuple[str, ...] = ("-nic", "none")
_counter = itertools.count()


class GuestError(LabError):
    """The guest did not reach a marker in time, or QEMU died."""


def tap_nic(tap: str, model: str = "e1000e", netdev_id: str = "n0") -> list[str]:
    """QEMU's own NIC on an existing tap (e1000e, virtio-net-pci, ...)."""
    return [
        "-netdev",
        f"tap,id={netdev_id},ifname={tap},script=no,downscript=no",
        "-device",
        f"{model},netdev={netdev_id}",
    ]


def vfio_user_device(cfg: LabConfig, socket_path: Path, **props: Any) -> str:
    """The JSON ``-device`` value attaching a vfio-user server's socket.

    The dotted form (``socket.path=``) does not work for this device; ``socket_path``
    is a host path under the lab dir, translated to what QEMU sees.
    """
    dev: dict[str, Any] = {
        "driver": "vfio-user-pci",
        "socket": {"type": "unix", "path": str(cfg.inner_path(socket_path))},
        **props,
    }
    return json.dumps(dev, separators=(",", ":"))


@dataclass
class ScriptResult:
    """Outcome of ``Guest.run_script``."""

    rc: int
    output: str  # guest console between "LAB_CMD:" and "LAB_CMD_RC=", \r removed
    accel: str
    boot_seconds: float  # QEMU start -> LAB_SHELL_READY (wall clock)
    guest_uptime: float  # guest's own uptime at LAB_SHELL_READY
    run_seconds: float  # LAB_CMD: -> LAB_CMD_RC= (wall clock, host side)
    stats_before: dict[str, float] | None = None  # None: no stats provider (TCG)
    stats_after: dict[str, float] | None = None
    stats_delta: dict[str, float] | None = field(default=None)


class Guest:
    """One QEMU guest. Use as a context manager; ``run_script`` is the usual entry.

    ``devices`` are values for ``-device`` (e.g. from ``vfio_user_device``); ``nic``
    is the network argument list (``tap_nic(...)``) or ``NO_NIC``; ``trace`` are
    ``-trace`` patterns, logged to ``trace_path``.
    """

    def __init__(
        self,
        cfg: LabConfig,
        *,
        netns: NetNs | str | None = None,
        name: str = "guest",
        memory_mb: int = 512,
        smp: int = 2,
        accel: Accel | None = None,
        nic: Sequence[str] = NO_NIC,
        devices: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        trace: Sequence[str] = (),
        lab_ip: str = GUEST_ADDR,
        cmdline_extra: str = "",
    ) -> None:
        self.cfg = cfg
        self.netns = netns.name if isinstance(netns, NetNs) else netns
        self.memory_mb, self.smp = memory_mb, smp
        self.accel = accel or detect_accel()
        self.nic, self.devices, self.extra_args = list(nic), list(devices), list(extra_args)
        self.trace, self.lab_ip, self.cmdline_extra = list(trace), lab_ip, cmdline_extra
        self.run_dir = cfg.paths.runs / f"{name}-{os.getpid()}-{next(_counter)}"
        self.serial_path = self.run_dir / "serial.log"
        self.qmp_path = self.run_dir / "qmp.sock"
        self.qemu_log = self.run_dir / "qemu.log"
        self.trace_path = self.run_dir / "trace.log"
        self._initrd = self.run_dir / "initrd.img"
        self._mounts = ChrootMounts(cfg)
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self._serial = bytearray()
        self._serial_file: Any = None
        self.cursor = 0
        self.started_at = 0.0

    # --- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Guest:
        self._mounts.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def inner(self, host_path: Path | str) -> str:
        """Path QEMU sees for a host path under the lab dir."""
        return str(self.cfg.inner_path(host_path))

    def qemu_argv(self, initrd: Path, argv_cmd: str | None = None) -> list[str]:
        mem = f"{self.memory_mb}M"
        append = f"console=ttyS0 quiet panic=-1 lab_ip={self.lab_ip} {self.cmdline_extra}".strip()
        if argv_cmd:
            append += f" -- {argv_cmd}"
        args = [
            "qemu-system-x86_64",
            "-name",
            self.run_dir.name,
            *self.accel.qemu_args,
            "-m",
            mem,
            "-smp",
            str(self.smp),
            "-object",
            f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-machine",
            "q35,memory-backend=mem",
            "-display",
            "none",
            "-no-reboot",
            "-no-shutdown",
            "-kernel",
            self.inner(self.cfg.paths.vmlinuz),
            "-initrd",
            self.inner(initrd),
            "-append",
            append,
            "-serial",
            f"file:{self.inner(self.serial_path)}",
            "-monitor",
            "none",
            "-qmp",
            f"unix:{self.inner(self.qmp_path)},server=on,wait=off",
        ]
        for pattern in self.trace:
            args += ["-trace", pattern]
        if self.trace:
            args += ["-D", self.inner(self.trace_path)]
        args += self.nic
        for dev in self.devices:
            args += ["-device", dev]
        return args + self.extra_args

    def boot(self, script: str | None = None, argv_cmd: str | None = None) -> None:
        """Start QEMU. ``script`` is run by /init as /lab-run.sh (per-run initrd);
        ``argv_cmd`` goes after ``--`` on the kernel command line (no quoting!)."""
        if self._proc is not None:
            raise LabError("guest already booted")
        if not self.cfg.paths.initramfs.exists():
            raise LabError("lab not built; run `python -m vmsilab build`")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        initrd = self.cfg.paths.initramfs
        if script is not None:
            initrd = make_run_initrd(initrd, script, self._initrd)
        argv = [*self.cfg.env_prefix(self.netns), *self.qemu_argv(initrd, argv_cmd)]
        (self.run_dir / "qemu.argv").write_text(json.dumps(argv, indent=1) + "\n")
        log.info("booting %s (accel %s: %s)", self.run_dir.name, self.accel.name, self.accel.reason)
        with self.qemu_log.open("wb") as logf:
            self.started_at = time.monotonic()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def close(self) -> None:
        """QMP quit, then SIGTERM/SIGKILL the QEMU process group; always."""
        try:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                try:
                    self.qmp.quit()
                except Exception as e:  # any failure: fall back to signals
                    log.debug("qmp quit failed: %s", e)
                _stop(proc)
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
            if self._serial_file is not None:
                self._serial_file.close()
                self._serial_file = None
            self._initrd.unlink(missing_ok=True)
        finally:
            self._mounts.__exit__(None, None, None)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- serial console --------------------------------------------------------------

    @property
    def serial(self) -> str:
        """Everything the guest printed so far (decoded leniently, \\r removed)."""
        self._read_serial()
        return self._serial.decode("utf-8", "replace").replace("\r", "")

    def _read_serial(self) -> None:
        if self._serial_file is None:
            try:
                self._serial_file = self.serial_path.open("rb")
            except FileNotFoundError:
                return
        chunk = self._serial_file.read()
        if chunk:
            self._serial += chunk.replace(b"\r", b"")

    def text(self, start: int = 0, end: int | None = None) -> str:
        """Serial output between two byte offsets (``cursor`` / match positions)."""
        self._read_serial()
        return self._serial[start:end].decode("utf-8", "replace")

    def _error(self, what: str) -> GuestError:
        return GuestError(
            f"{what} ({self.run_dir})\n--- qemu log tail:\n{file_tail(self.qemu_log)}"
            f"\n--- serial tail:\n{tail(bytes(self._serial), 25)}"
        )

    def wait_for(
        self, pattern: str | bytes, timeout: float, since: int | None = None
    ) -> re.Match[bytes]:
        """Wait until ``pattern`` appears in the serial log after ``since`` (default:
        the end of the previous match); advances the cursor past the match."""
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        start = self.cursor if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            self._read_serial()
            m = rx.search(self._serial, start)
            if m:
                self.cursor = m.end()
                return m
            if self._proc is None or self._proc.poll() is not None:
                self._read_serial()
                m = rx.search(self._serial, start)
                if m:
                    self.cursor = m.end()
                    return m
                rc = None if self._proc is None else self._proc.returncode
                raise self._error(f"QEMU exited (rc={rc}) before {rx.pattern!r}")
            if time.monotonic() > deadline:
                raise self._error(f"timeout after {timeout} s waiting for {rx.pattern!r}")
            time.sleep(0.05)

    def poll_for(self, pattern: str | bytes) -> re.Match[bytes] | None:
        """Non-blocking ``wait_for``: the first match after the cursor (advancing the
        cursor past it), or None. For driving several guests from one loop; raises
        GuestError if QEMU has exited without printing ``pattern``."""
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        self._read_serial()
        m = rx.search(self._serial, self.cursor)
        if m:
            self.cursor = m.end()
            return m
        if self._proc is None or self._proc.poll() is not None:
            self._read_serial()  # what it printed on the way out
            m = rx.search(self._serial, self.cursor)
            if m:
                self.cursor = m.end()
                return m
            rc = None if self._proc is None else self._proc.returncode
            raise self._error(f"QEMU exited (rc={rc}) before {rx.pattern!r}")
        return None

    def default_boot_timeout(self) -> float:
        return 120.0 if self.accel.name == "tcg" else 60.0

    def wait_ready(self, timeout: float | None = None) -> tuple[float, float]:
        """Wait for LAB_SHELL_READY; return (wall seconds since QEMU start, uptime)."""
        m = self.wait_for(READY_RE, timeout or self.default_boot_timeout())
        return time.monotonic() - self.started_at, float(m.group(1))

    # --- QMP ---------------------------------------------------------------------

    @property
    def qmp(self) -> Qmp:
        """Connected QMP session (connects on first use, waits for the socket)."""
        if self._qmp is None:
            deadline = time.monotonic() + 10
            while not self.qmp_path.exists():
                if not self.alive or time.monotonic() > deadline:
                    raise self._error("no QMP socket")
                time.sleep(0.05)
            self._qmp = Qmp(self.qmp_path)
        return self._qmp

    def query_stats(self) -> dict[str, float] | None:
        """Flattened query-stats (vm + vcpu); None when no provider (TCG)."""
        return self.qmp.query_stats()

    # --- the usual flow ----------------------------------------------------------

    def run_script(
        self,
        script: str,
        timeout: float = 120.0,
        *,
        boot_timeout: float | None = None,
        stats: bool = True,
    ) -> ScriptResult:
        """Boot with ``script`` as /lab-run.sh and wait for its exit code.

        QMP stats are snapshotted at LAB_CMD: and after LAB_POWEROFF (None under TCG).
        """
        self.boot(script=script)
        boot_s, uptime = self.wait_ready(boot_timeout)
        m_cmd = self.wait_for(CMD_RE, 30)
        t_cmd = time.monotonic()
        before = self.query_stats() if stats else None
        m_rc = self.wait_for(RC_RE, timeout)
        run_s = time.monotonic() - t_cmd
        out = self._serial[m_cmd.end() : m_rc.start()].decode("utf-8", "replace")
        self.wait_for(POWEROFF_RE, 30)
        after = self.query_stats() if stats else None
        return ScriptResult(
            rc=int(m_rc.group(1)),
            output=out,
            accel=self.accel.name,
            boot_seconds=boot_s,
            guest_uptime=uptime,
            run_seconds=run_s,
            stats_before=before,
            stats_after=after,
            stats_delta=diff_stats(before, after),
        )


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Wait for QEMU to leave after quit; then SIGTERM, then SIGKILL its group."""
    try:
        proc.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue
