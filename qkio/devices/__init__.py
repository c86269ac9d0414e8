"""Device models: pure Python, no /dev/kvm needed.

One module per device, named after what it models (as kvmtool's hw/):

* :mod:`.ioport` -- the port I/O bus that routes IN/OUT exits to devices;
* :mod:`.mmio` -- the MMIO bus that routes KVM_EXIT_MMIO accesses by address;
* :mod:`.serial` -- the 16550A UART behind the guest's console;
* :mod:`.debug_exit` -- QEMU's isa-debug-exit, how a test guest stops;
* :mod:`.fw_cfg` -- QEMU's firmware configuration ports.
"""

from qkio.devices.debug_exit import IsaDebugExit
from qkio.devices.fw_cfg import FwCfg
from qkio.devices.ioport import PortBus, PortConflict
from qkio.devices.serial import Serial

__all__ = ["FwCfg", "IsaDebugExit", "PortBus", "PortConflict", "Serial"]
