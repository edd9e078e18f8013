"""structlog configuration: one line per event on stderr, stable event names.

Events are named ``layer.thing_happened`` (``session.connected``,
``slowpath.restarted``) so logs can be grepped and counted; values go in
key=value fields. The hot path logs nothing unless the level is debug.
"""

from __future__ import annotations

import logging
import sys

import structlog

_debug = False


def configure_logging(level: str = "info", json: bool = False) -> None:
    global _debug
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    _debug = numeric <= logging.DEBUG
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S.%f", utc=False),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def debug_enabled() -> bool:
    """Whether debug events are emitted: hot paths check this once, not per event."""
    return _debug
