"""A real QEMU attaches to the server; the guest sees the 82576 VF on its PCI bus."""

from __future__ import annotations

import re

import pytest
from vmsilab.config import LabConfig
from vmsilab.guest import NO_NIC, Guest
from vmsilab.netns import NetNs
from vmsilab.vfserver import VfServer

# What the guest prints about the device: sysfs IDs, resources, and lspci's
# decoding of the capability list.
DEVICE_SCRIPT = r"""
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0x10ca ]; then
    echo "VF_AT=$(basename $d)"
    echo "VF_CLASS=$(cat $d/class)"
    echo "VF_RESOURCE_BEGIN"; cat $d/resource; echo "VF_RESOURCE_END"
    lspci -vvv -s $(basename $d)
  fi
done
"""


@pytest.mark.guest
def test_guest_sees_the_vf(lab: LabConfig, bare_netns: NetNs) -> None:
    with VfServer(lab, bare_netns, taps=False, extra_args=["--log-level", "debug"]) as server:
        with Guest(lab, netns=bare_netns, name="vfdev", nic=NO_NIC,
                   devices=[server.device_arg(0)], trace=["vfio_user_*"]) as guest:
            # Keep igbvf away: this test is about the PCI function alone.
            res = guest.run_script("rmmod igbvf 2>/dev/null\n" + DEVICE_SCRIPT, timeout=120)
        counters = server.counters()
    assert res.rc == 0, res.output
    assert "VF_AT=" in res.output, f"no 8086:10ca device in the guest:\n{res.output}"
    assert "VF_CLASS=0x020000" in res.output

    # BARs: BAR0 and BAR3, 16 KiB each, 64-bit memory (sysfs: start end flags).
    resources = res.output.split("VF_RESOURCE_BEGIN")[1].split("VF_RESOURCE_END")[0].split()
    rows = [resources[i : i + 3] for i in range(0, len(resources), 3)]
    sizes = [int(end, 16) - int(start, 16) + 1 if int(end, 16) else 0 for start, end, _ in rows]
    assert sizes[0] == 16384 and sizes[3] == 16384, rows
    assert sizes[1] == sizes[2] == sizes[4] == sizes[5] == 0, rows

    # Capabilities, as lspci decodes them from config space read over vfio-user.
    assert re.search(r"MSI-X: Enable[+-] Count=3 Masked[+-]", res.output), res.output
    assert "Vector table: BAR=3 offset=00000000" in res.output
    assert "PBA: BAR=3 offset=00002000" in res.output
    # QEMU presents an endpoint on the q35 root bus as Root Complex Integrated.
    assert re.search(r"Express \(v2\) (Root Complex Integrated )?Endpoint", res.output)
    assert "FLReset+" in res.output
    assert "Power Management" in res.output

    # The server saw QEMU's realize sequence, in order, and served it without errors.
    messages = counters["devices"]["vf0"]["messages"]
    for command in ("VERSION", "DMA_MAP", "DEVICE_GET_INFO", "DEVICE_GET_REGION_INFO",
                    "DEVICE_GET_IRQ_INFO", "REGION_READ", "REGION_WRITE", "DEVICE_RESET"):
        assert messages.get(command, {}).get("count", 0) > 0, (command, messages)
    assert messages["DEVICE_GET_REGION_INFO"]["errors"] == 0
    log = server.log()
    order = [log.find(event) for event in
             ("session.version", "session.dma_map", "session.connected")]
    assert -1 not in order, log[-3000:]
    assert order[0] < order[1], "VERSION must come before the DMA_MAP burst"
    assert server.stop() == 0
