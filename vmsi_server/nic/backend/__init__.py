"""Packet backends: where the NIC's frames go to and come from."""

from vmsi_server.nic.backend.base import PacketBackend
from vmsi_server.nic.backend.loop import LoopBackend
from vmsi_server.nic.backend.tap import TapBackend

__all__ = ["LoopBackend", "PacketBackend", "TapBackend"]
