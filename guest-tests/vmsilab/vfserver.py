"""The project's vfio-user server, run inside a lab network namespace.

The server opens its taps itself (they must live where it runs), and QEMU finds
its sockets under the lab directory (``/lab/...`` inside the chroot). This
wrapper starts it with the right paths, waits until every socket and the
control socket exist, reads counters through the control socket, and stops it
with SIGTERM, checking that it exits cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from vmsilab.config import LabConfig, LabError
from vmsilab.guest import vfio_user_device
from vmsilab.netns import NetNs

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # counters() talks to the server in-process
    sys.path.insert(0, str(REPO_ROOT))


class VfServer:
    """``vmsi-server`` with ``vfs`` VFs, tap ``tap{vf}`` each, in ``ns``."""

    def __init__(
        self,
        lab: LabConfig,
        ns: NetNs,
        *,
        vfs: int = 1,
        policy: str = "shadow",
        taps: bool = True,
        extra_args: Sequence[str] = (),
        log_name: str = "server.log",
        configure_taps: bool = True,
    ) -> None:
        self.lab = lab
        self.ns = ns
        self.vfs = vfs
        self.policy = policy
        self.taps = [f"tap{i}" for i in range(vfs)] if taps else []
        self.sockets = [ns.run_dir / f"vf{i}.sock" for i in range(vfs)]
        self.control = ns.run_dir / "control.sock"
        self.log_path = ns.run_dir / log_name
        self.extra_args = list(extra_args)
        self.log_name = log_name
        self.configure_taps = configure_taps
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "vmsi_server",
            "--socket-path", str(self.ns.run_dir / "vf{vf}.sock"),
            "--vfs", str(self.vfs),
            "--msix-policy", self.policy,
            "--control-socket", str(self.control),
        ]
        if self.taps:
            argv += ["--tap", "tap{vf}"]
        return argv + self.extra_args

    def __enter__(self) -> VfServer:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.proc = self.ns.popen(self.argv(), log_name=self.log_name, env=env, cwd=REPO_ROOT)
        try:
            for path in [*self.sockets, self.control]:
                self.ns.wait_for_path(path, 20, self.proc)
            if self.configure_taps and self.taps:
                # One peer address on the first tap; more VFs are bridged by the caller.
                self.ns.configure_link(self.taps[0])
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def device_arg(self, vf: int = 0, **props: Any) -> str:
        """The JSON ``-device`` argument QEMU needs for VF ``vf``."""
        return vfio_user_device(self.lab, self.sockets[vf], **props)

    def counters(self) -> dict[str, Any]:
        from vmsi_server.telemetry.control import query

        return query(str(self.control))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise LabError(f"server ignored SIGTERM:\n{self.log()[-2000:]}") from None
        self.returncode = proc.returncode
        self.proc = None
        return self.returncode
