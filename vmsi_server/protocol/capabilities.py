"""VERSION capabilities: parse the peer's JSON, negotiate, build the reply JSON.

The capability object (reference §5)::

    {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576,
                      "pgsizes": 4096, "max_dma_maps": 65535,
                      "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
                      "write_multiple": true}}

Everything is optional: no JSON, ``{}`` or an object without ``"capabilities"`` means
"all defaults". Anything malformed (bad JSON, wrong types, out-of-range values) is
EINVAL, like libvfio-user, because a client whose limits we misread would later send
messages we reject for reasons it cannot understand.

The reply must be a *subset* of what the client proposed and *short*: QEMU receives the
VERSION reply into a buffer the size of its own request, and refuses anything longer.
``max_msg_fds`` is always stated, because QEMU's default (8) and the spec's (1) differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZES,
    EINVAL,
    HEADER_SIZE,
    MAX_MSG_FDS_LIMIT,
    MAX_VERSION_JSON,
    MIN_DATA_XFER_SIZE,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    QEMU_MAX_DATA_XFER_SIZE,
    QEMU_MAX_MSG_FDS,
    REGION_ACCESS_FIXED,
    SPEC_DEFAULT_MAX_MSG_FDS,
    U64_LIMIT,
    VERSION_FIXED,
    WRITE_MULTI_ENTRY,
    WRITE_MULTI_MAX_ENTRIES,
)
from .errors import ProtocolError

PAGE_SIZE = 4096

QEMU_CAPABILITIES_JSON = (
    '{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,'
    '"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":268435456},'
    '"write_multiple":true}}'
)
"""What QEMU 10.1+ proposes (one fixed string; the key order is not guaranteed)."""


@dataclass(frozen=True, slots=True)
class MigrationCapability:
    """``"migration": {"pgsize": ..., "max_bitmap_size": ...}``; parsed for validation
    only: this server never negotiates migration."""

    pgsize: int
    max_bitmap_size: int | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """One side's capability object with defaults filled in.

    ``proposed`` names the keys that were actually present, because "absent" and
    "present with the default value" differ for the subset rule of the reply.
    """

    max_msg_fds: int = SPEC_DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    pgsizes: int = DEFAULT_PGSIZES
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    write_multiple: bool = False
    migration: MigrationCapability | None = None
    twin_socket: bool = False
    proposed: frozenset[str] = field(default=frozenset())

    def to_json(self) -> str:
        """Compact JSON proposing these capabilities (what a client sends)."""
        caps: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
        }
        if self.migration is not None:
            mig: dict[str, int] = {"pgsize": self.migration.pgsize}
            if self.migration.max_bitmap_size is not None:
                mig["max_bitmap_size"] = self.migration.max_bitmap_size
            caps["migration"] = mig
        if self.write_multiple:
            caps["write_multiple"] = True
        return _dumps({"capabilities": caps})


ClientCapabilities = Capabilities
"""The name the session uses for the client's side of the negotiation."""

QEMU_CAPABILITIES = Capabilities(
    max_msg_fds=16,
    max_data_xfer_size=DEFAULT_MAX_DATA_XFER_SIZE,
    pgsizes=PAGE_SIZE,
    max_dma_maps=DEFAULT_MAX_DMA_MAPS,
    write_multiple=True,
    migration=MigrationCapability(pgsize=PAGE_SIZE, max_bitmap_size=256 << 20),
    proposed=frozenset(
        {"max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps", "migration",
         "write_multiple"}
    ),
)


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(EINVAL, f"capabilities: {reason}")


def _reject_constant(name: str) -> None:
    raise _bad(f"{name} is not JSON")


def _uint(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """An integer in [lo, hi]. JSON booleans are rejected although Python calls them
    ints, and so are floats, which json.loads returns for ``1.0`` or ``1e3``."""
    value = obj[key]
    if type(value) is not int:
        raise _bad(f"{key} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _bad(f"{key} {value} outside {lo}..{hi}")
    return value


def _is_pgsize(value: int) -> bool:
    return value >= PAGE_SIZE and value & (value - 1) == 0


def parse_capabilities(text: str) -> Capabilities:
    """Parse the JSON text of a VERSION message (already stripped of its NUL).

    Raises ProtocolError(EINVAL) for anything malformed; returns defaults for no JSON,
    ``{}`` and an object without ``"capabilities"``.
    """
    if not text:
        return Capabilities()
    if len(text) > MAX_VERSION_JSON:
        raise _bad(f"longer than {MAX_VERSION_JSON} characters")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _bad(f"not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise _bad("top level is not an object")
    if "capabilities" not in doc:
        return Capabilities()
    caps = doc["capabilities"]
    if not isinstance(caps, dict):
        raise _bad('"capabilities" is not an object')

    kwargs: dict[str, Any] = {}
    if "max_msg_fds" in caps:
        kwargs["max_msg_fds"] = _uint(caps, "max_msg_fds", 0, MAX_MSG_FDS_LIMIT)
    if "max_data_xfer_size" in caps:
        kwargs["max_data_xfer_size"] = _uint(caps, "max_data_xfer_size", 1, U64_LIMIT - 1)
    if "pgsizes" in caps:
        pgsizes = _uint(caps, "pgsizes", PAGE_SIZE, U64_LIMIT - 1)
        if pgsizes % PAGE_SIZE:
            raise _bad(f"pgsizes {pgsizes:#x} includes pages below 4 KiB")
        kwargs["pgsizes"] = pgsizes
    if "max_dma_maps" in caps:
        kwargs["max_dma_maps"] = _uint(caps, "max_dma_maps", 1, U64_LIMIT - 1)
    if "write_multiple" in caps:
        if type(caps["write_multiple"]) is not bool:
            raise _bad("write_multiple must be a boolean")
        kwargs["write_multiple"] = caps["write_multiple"]
    if "migration" in caps:
        mig = caps["migration"]
        if not isinstance(mig, dict):
            raise _bad('"migration" is not an object')
        if "pgsize" not in mig:
            raise _bad("migration without pgsize")
        pgsize = _uint(mig, "pgsize", PAGE_SIZE, U64_LIMIT - 1)
        if not _is_pgsize(pgsize):
            raise _bad(f"migration pgsize {pgsize:#x} is not a power of two >= 4096")
        bitmap = None
        if "max_bitmap_size" in mig:
            bitmap = _uint(mig, "max_bitmap_size", 1, U64_LIMIT - 1)
        kwargs["migration"] = MigrationCapability(pgsize, bitmap)
    if "twin_socket" in caps:
        twin = caps["twin_socket"]
        if not isinstance(twin, dict):
            raise _bad('"twin_socket" is not an object')
        supported = twin.get("supported", False)
        if type(supported) is not bool:
            raise _bad("twin_socket.supported must be a boolean")
        kwargs["twin_socket"] = supported
    return Capabilities(**kwargs, proposed=frozenset(caps))


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What this server supports; validated against QEMU's own acceptance limits so that
    a misconfiguration fails at start-up, not as an aborted QEMU realize."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    pgsizes: int = DEFAULT_PGSIZES
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    write_multiple: bool = True
    minor: int = PROTOCOL_MINOR

    def __post_init__(self) -> None:
        if not 1 <= self.max_msg_fds <= QEMU_MAX_MSG_FDS:
            raise ValueError(f"max_msg_fds must be 1..{QEMU_MAX_MSG_FDS} (QEMU's limit)")
        if not MIN_DATA_XFER_SIZE <= self.max_data_xfer_size <= QEMU_MAX_DATA_XFER_SIZE:
            raise ValueError(
                f"max_data_xfer_size must be {MIN_DATA_XFER_SIZE}..{QEMU_MAX_DATA_XFER_SIZE}"
            )
        if self.pgsizes <= 0 or self.pgsizes % PAGE_SIZE:
            raise ValueError("pgsizes must be a non-zero multiple of 4096")
        if not 1 <= self.max_dma_maps <= DEFAULT_MAX_DMA_MAPS:
            raise ValueError(f"max_dma_maps must be 1..{DEFAULT_MAX_DMA_MAPS}")
        if not 0 <= self.minor <= 0xFFFF:
            raise ValueError("minor must fit in u16")


def max_message_size(max_data_xfer_size: int) -> int:
    """Largest legal message once negotiated: a REGION_WRITE of max_data_xfer_size, or
    the largest fixed-size message if that is bigger (a full WRITE_MULTI, a VERSION)."""
    return HEADER_SIZE + max(
        REGION_ACCESS_FIXED + max_data_xfer_size,
        8 + WRITE_MULTI_ENTRY * WRITE_MULTI_MAX_ENTRIES,
        VERSION_FIXED + MAX_VERSION_JSON + 1,
    )


@dataclass(frozen=True, slots=True)
class NegotiatedParameters:
    """The outcome of VERSION, identical on both ends.

    ``max_msg_fds``: fds per message the *server* accepts (what the reply states).
    ``client_max_msg_fds``: fds per message the *client* accepts (from its proposal).
    ``max_data_xfer_size`` bounds REGION_READ/WRITE counts and DMA_READ/WRITE counts.
    ``reply_capabilities``: the reply's JSON text, without NUL ("" for none).
    """

    major: int
    minor: int
    max_msg_fds: int
    client_max_msg_fds: int
    max_data_xfer_size: int
    pgsizes: int
    max_dma_maps: int
    write_multiple: bool
    reply_capabilities: str

    @property
    def max_message_size(self) -> int:
        return max_message_size(self.max_data_xfer_size)


def negotiate(
    client: Capabilities,
    server: ServerLimits,
    *,
    client_major: int = PROTOCOL_MAJOR,
    client_minor: int = PROTOCOL_MINOR,
    request_size: int | None = None,
) -> NegotiatedParameters:
    """Server side: agree on parameters and build a reply that QEMU will accept.

    ``request_size`` is the whole VERSION request (header included); the reply is kept
    within it by dropping the keys whose absence means the same thing to the client
    (``write_multiple`` falls back to off; ``max_data_xfer_size`` only when it equals
    the default). ``max_msg_fds`` is never dropped.
    """
    if client_major != PROTOCOL_MAJOR:
        raise ProtocolError(EINVAL, f"unsupported protocol major {client_major}")
    minor = min(client_minor, server.minor)
    pgsizes = client.pgsizes & server.pgsizes
    if not pgsizes:
        raise ProtocolError(EINVAL, f"no common page size (client pgsizes {client.pgsizes:#x})")
    max_xfer = min(client.max_data_xfer_size, server.max_data_xfer_size)
    max_dma_maps = min(client.max_dma_maps, server.max_dma_maps)
    write_multiple = client.write_multiple and server.write_multiple

    def build(with_xfer: bool, with_multi: bool) -> dict[str, Any]:
        caps: dict[str, Any] = {"max_msg_fds": server.max_msg_fds}
        if with_xfer:
            caps["max_data_xfer_size"] = max_xfer
        if max_dma_maps != DEFAULT_MAX_DMA_MAPS:
            caps["max_dma_maps"] = max_dma_maps
        if pgsizes != DEFAULT_PGSIZES:
            caps["pgsizes"] = pgsizes
        if with_multi:
            caps["write_multiple"] = True
        return caps

    budget = None if request_size is None else request_size - HEADER_SIZE - VERSION_FIXED - 1
    text = _dumps({"capabilities": build(True, write_multiple)})
    if budget is not None and len(text) > budget:
        for with_xfer, with_multi in (
            (True, False),
            (max_xfer != DEFAULT_MAX_DATA_XFER_SIZE, False),
        ):
            text = _dumps({"capabilities": build(with_xfer, with_multi)})
            write_multiple = with_multi
            if len(text) <= budget:
                break
    return NegotiatedParameters(
        major=PROTOCOL_MAJOR,
        minor=minor,
        max_msg_fds=server.max_msg_fds,
        client_max_msg_fds=client.max_msg_fds,
        max_data_xfer_size=max_xfer,
        pgsizes=pgsizes,
        max_dma_maps=max_dma_maps,
        write_multiple=write_multiple,
        reply_capabilities=text,
    )


_FEATURE_KEYS = ("write_multiple", "twin_socket", "migration")


def accept_server_reply(
    proposed: Capabilities,
    *,
    server_major: int,
    server_minor: int,
    server_text: str,
    our_minor: int = PROTOCOL_MINOR,
) -> NegotiatedParameters:
    """Client side: check the server's VERSION reply against what we proposed.

    Mirrors QEMU's checks that matter for interop: same major, minor not above ours, and
    no feature the client did not ask for (QEMU only warns; our client is strict so that
    tests catch a server that breaks the subset rule).
    """
    if server_major != PROTOCOL_MAJOR:
        raise ProtocolError(EINVAL, f"server speaks major {server_major}")
    if server_minor > our_minor:
        raise ProtocolError(EINVAL, f"server minor {server_minor} above ours ({our_minor})")
    server = parse_capabilities(server_text)
    for key in _FEATURE_KEYS:
        if key in server.proposed and key not in proposed.proposed and getattr(server, key):
            raise ProtocolError(EINVAL, f"server enabled {key}, which we did not propose")
    if server.twin_socket:
        raise ProtocolError(EINVAL, "server enabled twin_socket, which is not supported")
    if server.max_data_xfer_size > proposed.max_data_xfer_size and (
        "max_data_xfer_size" in proposed.proposed
    ):
        # The server may lower the limit, never raise it above ours.
        max_xfer = proposed.max_data_xfer_size
    else:
        max_xfer = server.max_data_xfer_size
    return NegotiatedParameters(
        major=server_major,
        minor=server_minor,
        max_msg_fds=server.max_msg_fds,
        client_max_msg_fds=proposed.max_msg_fds,
        max_data_xfer_size=max_xfer,
        pgsizes=server.pgsizes,
        max_dma_maps=server.max_dma_maps,
        write_multiple=server.write_multiple and proposed.write_multiple,
        reply_capabilities=server_text,
    )
