"""Fixtures for real-QEMU guest tests.

``lab`` builds (or reuses) the lab once per session; it skips with the reason when
the machine cannot host it (not root, not Debian, build impossible), unless
``VMSI_LAB_REQUIRED=1`` turns that into an error (for machines that must run them).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmsilab.build import build
from vmsilab.config import LabConfig, LabError, read_os_release
from vmsilab.netns import NetNs
from vmsilab.progress import setup_logging


def _unavailable(reason: str) -> None:
    if os.environ.get("VMSI_LAB_REQUIRED") == "1":
        pytest.fail(f"guest lab required but unavailable: {reason}")
    pytest.skip(f"guest lab unavailable: {reason}")


@pytest.fixture(scope="session")
def lab() -> LabConfig:
    """The built lab (QEMU with vfio-user-pci, guest kernel, initramfs)."""
    if not sys.platform.startswith("linux"):
        _unavailable("needs Linux")
    if os.geteuid() != 0:
        _unavailable("needs root (chroot, mounts, network namespaces)")
    host = read_os_release()
    if not host.is_debian:
        _unavailable(f"needs a Debian 12 or 13 host, this is {host.id} {host.version_id}")
    setup_logging()
    try:
        cfg = LabConfig.from_env()
        build(cfg)
    except LabError as e:
        _unavailable(f"lab build failed: {e}")
    return cfg


@pytest.fixture
def netns(lab: LabConfig) -> Iterator[NetNs]:
    """Private netns with tap0 at 10.0.0.1/24 and an iperf3 server on it."""
    with NetNs(lab, tap="tap0", iperf3_server=True) as ns:
        yield ns


@pytest.fixture
def bare_netns(lab: LabConfig) -> Iterator[NetNs]:
    """Private netns without a tap: a vfio-user server creates it; then call
    ``ns.configure_link("tap0")`` and, if needed, ``ns.start_iperf3()``."""
    with NetNs(lab, tap=None) as ns:
        yield ns
