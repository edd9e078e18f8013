"""Pick the accelerator: KVM only where it can boot a stock kernel, else TCG.

``/dev/kvm`` alone proves nothing: the build machines have a software PVM variant
that exists, opens, and cannot boot a stock Debian kernel (guest-lab.md §7). Real
hardware virtualization shows up as ``vmx``/``svm`` in /proc/cpuinfo, so KVM is
used only when both hold. ``VMSI_ACCEL=tcg|kvm`` overrides the detection.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import LabError


@dataclass(frozen=True)
class Accel:
    """The accelerator chosen for a guest and the QEMU arguments it implies."""

    name: str  # "kvm" or "tcg"
    reason: str

    @property
    def qemu_args(self) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg", "-cpu", TCG_CPU]


TCG_CPU = "max,erms=off,fsrm=off"
"""The TCG guest's CPU: everything ``max`` has except ERMS/FSRM. With them the guest
kernel copies with ``rep movsb``, which TCG runs one byte at a time and, whenever
source and destination pages collide in its software TLB, through the slow-path
helpers (``helper_ldub_mmu``/``helper_stb_mmu``): per boot, at random, the guest's
copies then cost twice as much and iperf3's rate halves, for any NIC. Without them
it copies in 8-byte moves, about three times faster, and the coin toss is gone."""


def cpu_has_hw_virt(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(
        re.search(r"\b(vmx|svm)\b", line) for line in text.splitlines() if line.startswith("flags")
    )


def kvm_usable(dev: str = "/dev/kvm") -> bool:
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def detect_accel() -> Accel:
    """KVM if the CPU has VMX/SVM and /dev/kvm opens, else TCG; env may override."""
    forced = os.environ.get("VMSI_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise LabError(f"VMSI_ACCEL must be kvm or tcg, not {forced!r}")
        return Accel(forced, "VMSI_ACCEL")
    hw, dev = cpu_has_hw_virt(), kvm_usable()
    if hw and dev:
        return Accel("kvm", "vmx/svm in cpuinfo and /dev/kvm opens")
    why = "no vmx/svm in /proc/cpuinfo" if not hw else "/dev/kvm cannot be opened"
    return Accel("tcg", why)
