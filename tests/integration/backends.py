"""Which protocol backends the integration tests run against, and where they differ.

``VMSI_TEST_BACKENDS`` (comma-separated, default ``engine,engine-python,libvfio-user``)
picks the backends: ``engine`` is the project's engine with its compiled fast
lane (``--fast-lane on``), ``engine-python`` the same engine on the pure Python
path (``--fast-lane off``), so every test checks that both answer alike;
``libvfio-user`` is skipped, with the reason, when the library cannot be loaded
(see README: ``--libvfio-user`` / ``LIBVFIO_USER_SO``).

``LIBVFIO_USER_DIFFERS`` lists tests whose expectation is the engine's and
that libvfio-user answers differently, with why (docs/libvfio-user.md). They
are marked xfail(strict) on that backend only: a fix upstream shows up as an
XPASS failure, and every other test must pass on both.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENGINE = "engine"
ENGINE_PYTHON = "engine-python"
LIBVFIO_USER = "libvfio-user"
ENV = "VMSI_TEST_BACKENDS"


def selected() -> list[str]:
    default = f"{ENGINE},{ENGINE_PYTHON},{LIBVFIO_USER}"
    names = [n.strip() for n in os.environ.get(ENV, default).split(",")]
    unknown = set(names) - {ENGINE, ENGINE_PYTHON, LIBVFIO_USER, ""}
    if unknown:
        raise pytest.UsageError(f"{ENV}: unknown backend(s) {sorted(unknown)}")
    return [n for n in names if n]


def server_args(backend: str) -> tuple[str, ...]:
    """Extra ``vmsi-server`` arguments for a backend, or skip the test."""
    if backend == ENGINE:
        # The lane is built by `make setup`; a missing one is a failure, not a skip.
        return ("--fast-lane", "on")
    if backend == ENGINE_PYTHON:
        return ("--fast-lane", "off")
    from bindings.libvfio_user import available

    reason = available()
    if reason is not None:
        pytest.skip(f"libvfio-user backend: {reason}")
    # The server finds it the same way ($LIBVFIO_USER_SO is inherited).
    return ("--backend", LIBVFIO_USER)


LIBVFIO_USER_DIFFERS: dict[str, str] = {
    "test_irq_info":
        "GET_IRQ_INFO never reports MASKABLE (the engine does: it implements MSI-X "
        "MASK/UNMASK)",
    "test_write_multi":
        "no REGION_WRITE_MULTI (command 15): the posted batch is refused unseen",
    "test_partial_deassign_closes_exactly_that_range":
        "irqs_disable() closes [start, count) instead of [start, start+count)",
    "test_zero_count_access":
        "a zero-count REGION_READ/WRITE is answered with a bare header, without the "
        "region/offset/count body a reply carries, so a strict client rejects it",
    "test_dma_map_unmap":
        "an overlapping DMA_MAP fails with EINVAL, not EEXIST",
    "test_bad_set_irqs_is_refused_and_fds_closed[2-12-0-1-1]":
        "MASK with DATA_EVENTFD is accepted (the fd is ignored), not refused with EINVAL",
    "test_dma_map_bad_fd_is_refused_and_closed":
        "an unmappable fd (a pipe) fails DMA_MAP with mmap's EACCES, not EINVAL/EFAULT",
}


def mark_differences(items: list[pytest.Item], under: Path) -> None:
    for item in items:
        if under not in item.path.parents:
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("backend") != LIBVFIO_USER:
            continue
        name = (item.name.replace(f"[{LIBVFIO_USER}]", "")
                .replace(f"{LIBVFIO_USER}-", "").replace(f"-{LIBVFIO_USER}", ""))
        reason = LIBVFIO_USER_DIFFERS.get(name)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=f"libvfio-user: {reason}", strict=True))
