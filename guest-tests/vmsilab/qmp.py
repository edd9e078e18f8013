"""Synchronous QMP on top of the maintained ``qemu.qmp`` library.

Tests are plain synchronous code; qemu.qmp is asyncio. One private event loop per
connection bridges them (qemu.qmp's own ``legacy`` wrapper does the same but is
meant for QEMU's iotests).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

log = logging.getLogger("vmsilab")


class Qmp:
    """A connected QMP session with blocking calls and per-call timeouts."""

    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("vmsilab")
        try:
            self._sync(self._client.connect(str(socket_path)))
        except BaseException:
            self._loop.close()
            raise

    def _sync(self, coro: Any, timeout: float | None = None) -> Any:
        return self._loop.run_until_complete(
            asyncio.wait_for(coro, timeout if timeout is not None else self.timeout)
        )

    def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run one command; raises qemu.qmp.ExecuteError on a QMP error reply."""
        return self._sync(self._client.execute(cmd, args), timeout)

    def query_stats(self) -> dict[str, float] | None:
        """``query-stats`` for targets vm and vcpu, flattened.

        Keys are ``target/provider/name``; vCPU values are summed and histograms
        skipped. None means no stats provider (TCG): *not measured*, not zero.
        """
        flat: dict[str, float] = {}
        for target in ("vm", "vcpu"):
            for entry in self.execute("query-stats", {"target": target}) or []:
                provider = entry.get("provider", "?")
                for stat in entry.get("stats", []):
                    value = stat.get("value")
                    if isinstance(value, bool):
                        value = int(value)
                    if not isinstance(value, (int, float)):
                        continue  # histogram
                    key = f"{target}/{provider}/{stat['name']}"
                    flat[key] = flat.get(key, 0) + value
        return flat or None

    def quit(self) -> None:
        """Ask QEMU to exit; the connection dropping mid-reply is expected."""
        try:
            self.execute("quit", timeout=5)
        except Exception as e:  # QEMU may exit before it replies
            log.debug("qmp quit: %s", e)

    def close(self) -> None:
        try:
            self._sync(self._client.disconnect(), 5)
        except Exception as e:  # best effort on teardown
            log.debug("qmp disconnect: %s", e)
        finally:
            self._loop.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def diff_stats(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    """Per-run deltas of two query_stats snapshots (None if either is None)."""
    if before is None or after is None:
        return None
    return {k: after[k] - before.get(k, 0) for k in after}
