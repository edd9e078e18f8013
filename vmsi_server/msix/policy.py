"""Which path serves which MSI-X event, per policy: a table, not an if-chain.

Paths:

* ``fast``: answered from fast-path state in the I/O process, no round trip.
* ``forward``: one round trip to the slow-path worker; its answer is returned.
* ``write-through``: fast-path state is updated and the slow path is told in
  one round trip; its acknowledgement gates the reply.

Policies (the flag ``--msix-path``):

* ``shadow`` - the 2010 Xen patch: every table and PBA read from the fast
  path; address/data writes written through; mask changes fast.
* ``legacy`` - Xen before the patch: 4-byte Vector Control reads and mask
  writes fast (vmsi.c's interception); every other table read (address/data,
  any QWORD) and every PBA read forwarded; address/data written through.
* ``forward-all`` - every MSI-X event the server receives (BAR accesses,
  Message Control changes, SET_IRQS) waits for a slow-path round trip, so a
  stock QEMU guest's mask/unmask traffic (fd swaps) pays the forwarding cost.
"""

from __future__ import annotations

import enum
from types import MappingProxyType


class Path(enum.Enum):
    FAST = "fast"
    FORWARD = "forward"
    WRITE_THROUGH = "write-through"

    @property
    def round_trip(self) -> bool:
        return self is not Path.FAST


class AccessKind(enum.Enum):
    """An MSI-X event kind: (counter region, counter kind)."""

    TABLE_READ_ADDR_DATA = ("msix-table", "read-addr-data")
    """4-byte read of Message Address (low/high) or Message Data."""
    TABLE_READ_CONTROL = ("msix-table", "read-control")
    """4-byte read of Vector Control (what pre-2010 Xen served itself)."""
    TABLE_READ_QWORD = ("msix-table", "read-qword")
    TABLE_WRITE_ADDR_DATA = ("msix-table", "write-addr-data")
    """Any write touching address or data (a QWORD at +8 also carries control)."""
    TABLE_WRITE_CONTROL = ("msix-table", "write-control")
    PBA_READ = ("msix-pba", "read")
    PBA_WRITE = ("msix-pba", "write")
    CONTROL_CHANGED = ("msix-config", "message-control")
    IRQ_MASK = ("msix-irqs", "mask")
    IRQ_UNMASK = ("msix-irqs", "unmask")
    IRQ_TRIGGER = ("msix-irqs", "trigger")
    IRQ_EVENTFD_INSTALL = ("msix-irqs", "eventfd-install")
    IRQ_EVENTFD_SWAP = ("msix-irqs", "eventfd-swap")
    IRQ_EVENTFD_DEASSIGN = ("msix-irqs", "eventfd-deassign")
    IRQ_DISABLE_ALL = ("msix-irqs", "disable-all")

    @property
    def region(self) -> str:
        return self.value[0]

    @property
    def kind(self) -> str:
        return self.value[1]


class PathPolicy(enum.Enum):
    SHADOW = "shadow"
    LEGACY = "legacy"
    FORWARD_ALL = "forward-all"

    @classmethod
    def parse(cls, text: str) -> PathPolicy:
        try:
            return cls(text.strip().lower().replace("_", "-"))
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown MSI-X path policy {text!r} (one of {choices})") from None

    def path(self, kind: AccessKind) -> Path:
        return DECISIONS[self][kind]


_F, _FW, _WT = Path.FAST, Path.FORWARD, Path.WRITE_THROUGH
K = AccessKind

_TABLE: tuple[tuple[AccessKind, Path, Path, Path], ...] = (
    # kind                      shadow  legacy  forward-all
    (K.TABLE_READ_ADDR_DATA,    _F,     _FW,    _FW),
    (K.TABLE_READ_CONTROL,      _F,     _F,     _FW),
    (K.TABLE_READ_QWORD,        _F,     _FW,    _FW),
    (K.TABLE_WRITE_ADDR_DATA,   _WT,    _WT,    _WT),
    (K.TABLE_WRITE_CONTROL,     _F,     _F,     _WT),
    (K.PBA_READ,                _F,     _FW,    _FW),
    (K.PBA_WRITE,               _F,     _F,     _FW),
    (K.CONTROL_CHANGED,         _F,     _F,     _WT),
    (K.IRQ_MASK,                _F,     _F,     _WT),
    (K.IRQ_UNMASK,              _F,     _F,     _WT),
    (K.IRQ_TRIGGER,             _F,     _F,     _WT),
    (K.IRQ_EVENTFD_INSTALL,     _F,     _F,     _WT),
    (K.IRQ_EVENTFD_SWAP,        _F,     _F,     _WT),
    (K.IRQ_EVENTFD_DEASSIGN,    _F,     _F,     _WT),
    (K.IRQ_DISABLE_ALL,         _F,     _F,     _WT),
)  # fmt: skip

DECISIONS: MappingProxyType[PathPolicy, MappingProxyType[AccessKind, Path]] = MappingProxyType(
    {
        policy: MappingProxyType({kind: paths[column] for kind, *paths in _TABLE})
        for column, policy in enumerate(
            (PathPolicy.SHADOW, PathPolicy.LEGACY, PathPolicy.FORWARD_ALL)
        )
    }
)
assert all(len(d) == len(AccessKind) for d in DECISIONS.values()), "a kind lacks a decision"
