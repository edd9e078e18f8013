"""Hypothesis fuzzing of the server connection: any bytes, any split, only clean events.

Skipped when hypothesis is not installed (it is not among the declared test extras).
"""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import ServerConnection

from .helpers import drain, ready_server
from .test_fuzz import COMMANDS, EVENT_TYPES

pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(min_value=1, max_value=64), max_size=20),
       st.booleans())
def test_hypothesis_bytes(data: bytes, cuts: list[int], ready: bool) -> None:
    conn = ready_server() if ready else ServerConnection()
    pos = 0
    for cut in cuts:
        conn.receive_data(data[pos:pos + cut])
        pos += cut
    conn.receive_data(data[pos:])
    assert all(isinstance(e, EVENT_TYPES) for e in drain(conn))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.sampled_from(COMMANDS), st.integers(0, 0xFF),
       st.binary(max_size=300))
def test_hypothesis_structured(msg_id: int, command: int, flags: int, body: bytes) -> None:
    conn = ready_server()
    raw = struct.pack("<HHIII", msg_id, command, 16 + len(body), flags, 0) + body
    conn.receive_data(raw)
    events = drain(conn)
    assert len(events) == 1 and isinstance(events[0], EVENT_TYPES)
