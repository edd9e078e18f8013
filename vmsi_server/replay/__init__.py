"""Replay: many guests without many VMs.

N simulated guests, each its own vfio-user connection to its own VF of one
server (``vmsi-server --vfs N``), set up the way Linux sets up MSI-X and then
reacting to real interrupts (eventfds the device writes) with Linux's
mask / flush / unmask pattern. See ``model.py`` for the load model,
``guest.py`` for what one guest sends, ``runner.py`` for the loop, and
``python -m vmsi_server.replay --help`` for the command line.
"""

from vmsi_server.replay.model import GuestKernel, LoadModel, socket_paths
from vmsi_server.replay.runner import Replay, ReplayRun
from vmsi_server.replay.stats import ReplayStats

__all__ = ["GuestKernel", "LoadModel", "Replay", "ReplayRun", "ReplayStats", "socket_paths"]
