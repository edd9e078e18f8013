"""A private network namespace as the guest's only network peer.

Test traffic must never leave the machine, so the guest's NIC (QEMU's tap, or the
tap the vfio-user server opens) lives in a namespace created here, with the peer
address 10.0.0.1/24 and optionally an iperf3 server bound to it. Everything started
inside is stopped, and the namespace deleted, on exit.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .config import LabConfig, LabError
from .mounts import ChrootMounts
from .proc import file_tail, run

log = logging.getLogger("vmsilab")

PEER_ADDR = "10.0.0.1/24"
GUEST_ADDR = "10.0.0.2/24"
IPERF3_PORT = 5201
_NAME_RE = re.compile(r"^vmsi-(\d+)-\d+$")
_counter = itertools.count()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_netns() -> list[str]:
    cp = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _kill_netns_pids(name: str) -> None:
    """Stop every process still inside the namespace (they are all ours)."""
    cp = run(["ip", "netns", "pids", name], check=False)
    pids = [int(p) for p in cp.stdout.split() if p.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def delete_netns(name: str) -> None:
    _kill_netns_pids(name)
    run(["ip", "netns", "del", name], check=False)


def reap_stale() -> list[str]:
    """Delete vmsi-<pid>-<n> namespaces whose creating process is gone."""
    reaped = []
    for name in list_netns():
        m = _NAME_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            delete_netns(name)
            reaped.append(name)
    if reaped:
        log.info("removed stale network namespaces: %s", " ".join(reaped))
    return reaped


class NetNs:
    """Context manager for a uniquely named netns with optional tap and iperf3 server.

    ``tap=None`` leaves creating the tap to someone else (the vfio-user server opens
    it by name); call ``configure_link(name)`` once it exists, then
    ``start_iperf3()``.
    """

    def __init__(
        self,
        cfg: LabConfig,
        *,
        tap: str | None = "tap0",
        address: str = PEER_ADDR,
        iperf3_server: bool = False,
    ) -> None:
        self.cfg = cfg
        self.tap = tap
        self.address = address
        self.name = f"vmsi-{os.getpid()}-{next(_counter)}"
        self.run_dir = cfg.paths.runs / self.name
        self._want_iperf3 = iperf3_server
        self._iperf3_pid: int | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._mounts = ChrootMounts(cfg)
        self._created = False

    # --- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> NetNs:
        try:
            self._mounts.__enter__()
            reap_stale()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run(["ip", "netns", "add", self.name])
            self._created = True
            self.exec(["ip", "link", "set", "lo", "up"])
            if self.tap:
                self.exec(["ip", "tuntap", "add", "dev", self.tap, "mode", "tap"])
                self.configure_link(self.tap)
                if self._want_iperf3:
                    self.start_iperf3()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop processes, delete the namespace, release the chroot mounts."""
        try:
            self.stop_iperf3()
            for p in reversed(self._procs):
                _stop_popen(p)
            self._procs.clear()
            if self._created:
                delete_netns(self.name)
                self._created = False
        finally:
            self._mounts.__exit__(None, None, None)

    # --- running things inside -------------------------------------------------------

    def exec(self, argv: Sequence[str | Path], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a host command inside the namespace (``ip netns exec``), checked."""
        return run(["ip", "netns", "exec", self.name, *argv], **kw)  # type: ignore[arg-type]

    def popen(
        self,
        argv: Sequence[str | Path],
        *,
        log_name: str,
        in_env: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running host process inside the namespace, stopped on exit.

        Output goes to ``run_dir/log_name``. ``in_env=True`` runs it where QEMU lives
        (the chroot on Debian 12) instead of on the host.
        """
        prefix = self.cfg.env_prefix(self.name) if in_env else ["ip", "netns", "exec", self.name]
        logf = (self.run_dir / log_name).open("ab")
        try:
            p = subprocess.Popen(
                [*prefix, *map(str, argv)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
        finally:
            logf.close()
        self._procs.append(p)
        return p

    def wait_for_path(
        self, path: Path, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
    ) -> None:
        """Wait for a file (e.g. a server's socket) to appear; fail early, with the
        process's log tail, if ``proc`` exits first."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if proc is not None and proc.poll() is not None:
                logs = "\n".join(file_tail(f, 15) for f in sorted(self.run_dir.glob("*.log")))
                raise LabError(f"process exited (rc={proc.returncode}) before {path}:\n{logs}")
            if time.monotonic() > deadline:
                raise LabError(f"{path} did not appear within {timeout} s")
            time.sleep(0.05)

    def link_exists(self, name: str) -> bool:
        return run(["ip", "-n", self.name, "link", "show", name], check=False).returncode == 0

    def configure_link(self, name: str, address: str | None = None, timeout: float = 10.0) -> None:
        """Wait for link ``name`` (possibly created by another process), give it the
        peer address and bring it up."""
        deadline = time.monotonic() + timeout
        while not self.link_exists(name):
            if time.monotonic() > deadline:
                raise LabError(f"link {name} did not appear in netns {self.name}")
            time.sleep(0.05)
        addr = address or self.address
        have = run(["ip", "-n", self.name, "-o", "addr", "show", "dev", name], check=False)
        if f" {addr} " not in have.stdout:
            run(["ip", "-n", self.name, "addr", "add", addr, "dev", name])
        run(["ip", "-n", self.name, "link", "set", name, "up"])

    @property
    def peer_ip(self) -> str:
        return self.address.split("/")[0]

    # --- iperf3 peer -----------------------------------------------------------------

    def start_iperf3(self, timeout: float = 10.0) -> None:
        """iperf3 -s bound to the peer address, daemonized, from the chroot's iperf3."""
        pidfile = self.run_dir / "iperf3-server.pid"
        logfile = self.run_dir / "iperf3-server.log"
        pidfile.unlink(missing_ok=True)
        run(
            [
                *self.cfg.env_prefix(self.name),
                "iperf3",
                "-s",
                "-B",
                self.peer_ip,
                "-D",
                "--pidfile",
                str(self.cfg.inner_path(pidfile)),
                "--logfile",
                str(self.cfg.inner_path(logfile)),
            ]
        )
        deadline = time.monotonic() + timeout
        while True:
            if pidfile.exists() and pidfile.read_text().strip().isdigit():
                self._iperf3_pid = int(pidfile.read_text().strip())
            listening = run(
                ["ip", "netns", "exec", self.name, "ss", "-Hltn", f"sport = :{IPERF3_PORT}"],
                check=False,
            ).stdout.strip()
            if self._iperf3_pid and listening:
                return
            if time.monotonic() > deadline:
                raise LabError(f"iperf3 server did not start:\n{file_tail(logfile)}")
            time.sleep(0.05)

    def stop_iperf3(self) -> None:
        pid, self._iperf3_pid = self._iperf3_pid, None
        if pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if not _alive(pid):
                return


def _stop_popen(p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group we started, then SIGKILL after ``grace``."""
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
