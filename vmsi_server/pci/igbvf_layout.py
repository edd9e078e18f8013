"""The 82576 VF (8086:10ca) config layout, per reference/igbvf.md section 1.

Capability placement: PM at 0x50 -> MSI-X at 0x70 -> PCIe at 0xA0 -> end.
MSI-X and PCIe sit where the real VF and QEMU put them; PM goes at 0x50
because the 0x3C-byte PCIe v2 capability occupies 0xA0..0xDB, so 0xC8 would
overlap it. The list is linked in ascending offset order (QEMU's own igbvf
links PCIe first; the driver walks the list and does not care).

BARs are 64-bit prefetchable like QEMU's model, so vfio-user regions 1 and 4
(the upper halves) must be reported with size 0.
"""

from __future__ import annotations

from vmsi_server.pci.bars import BarKind, BarSpec
from vmsi_server.pci.capabilities import (
    MsixCapability,
    PciExpressCapability,
    PlacedCapability,
    PowerManagementCapability,
)
from vmsi_server.pci.config_space import ConfigSpace
from vmsi_server.pci.header import PciIdentity
from vmsi_server.pci.layout import PciFunctionLayout

IGBVF_REGISTER_BAR = 0
IGBVF_MSIX_BAR = 3
IGBVF_BAR_SIZE = 16 * 1024
IGBVF_MSIX_VECTORS = 3
IGBVF_MSIX_TABLE_OFFSET = 0x0000
IGBVF_MSIX_PBA_OFFSET = 0x2000

IGBVF_PM_OFFSET = 0x50
IGBVF_MSIX_OFFSET = 0x70
IGBVF_PCIE_OFFSET = 0xA0

IGBVF_IDENTITY = PciIdentity(
    vendor_id=0x8086,
    device_id=0x10CA,
    revision=0x01,
    class_code=0x020000,
    subsystem_vendor_id=0x8086,
    subsystem_id=0x0000,
    interrupt_pin=0,
)

IGBVF_LAYOUT = PciFunctionLayout(
    identity=IGBVF_IDENTITY,
    bars=(
        BarSpec(IGBVF_REGISTER_BAR, IGBVF_BAR_SIZE, BarKind.MEM64, prefetchable=True),
        BarSpec(IGBVF_MSIX_BAR, IGBVF_BAR_SIZE, BarKind.MEM64, prefetchable=True),
    ),
    capabilities=(
        PlacedCapability(IGBVF_PM_OFFSET, PowerManagementCapability()),
        PlacedCapability(
            IGBVF_MSIX_OFFSET,
            MsixCapability(
                table_size=IGBVF_MSIX_VECTORS,
                table_bar=IGBVF_MSIX_BAR,
                table_offset=IGBVF_MSIX_TABLE_OFFSET,
                pba_bar=IGBVF_MSIX_BAR,
                pba_offset=IGBVF_MSIX_PBA_OFFSET,
            ),
        ),
        PlacedCapability(IGBVF_PCIE_OFFSET, PciExpressCapability(flr=True, max_payload=512)),
    ),
)


def igbvf_config_space() -> ConfigSpace:
    """A fresh, power-on config space for one VF instance."""
    return IGBVF_LAYOUT.build()
