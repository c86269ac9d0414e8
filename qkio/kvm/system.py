"""``Kvm``: the /dev/kvm fd -- API version, capabilities, supported CPUID, VM creation."""

from __future__ import annotations

import errno
import functools
import os

from ..errors import KvmError, KvmUnavailable
from . import ioctl as io
from . import structs as s
from .constants import KVM_API_VERSION, Cap

DEV_KVM = "/dev/kvm"


class Kvm:
    """An open ``/dev/kvm``.

    Opening it is where most "KVM does not work here" problems show up, so the
    constructor turns each into one :class:`KvmUnavailable` whose message says
    which problem it is and what to do about it.
    """

    def __init__(self, path: str = DEV_KVM):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: this machine has no KVM. Load the kvm_intel or kvm_amd "
                "module, or enable (nested) virtualization for this VM.") from None
        except PermissionError:
            raise KvmUnavailable(
                f"no permission to open {path}: add your user to its group "
                "(usually 'kvm': sudo usermod -aG kvm $USER) and log in again.") from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        try:
            version = self.get_api_version()
        except KvmError as e:
            self.close()
            raise KvmUnavailable(f"{path} is not a KVM device ({e})") from None
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"{path} speaks KVM API {version}; qkio needs {KVM_API_VERSION}")

    def get_api_version(self) -> int:
        """``KVM_GET_API_VERSION``: 12 on every kernel since 2.6.22."""
        return io.ioctl(self.fd, io.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if ``cap`` is absent, else a positive value (often a limit)."""
        return io.ioctl(self.fd, io.KVM_CHECK_EXTENSION, int(cap))

    def capabilities(self) -> dict[str, int]:
        """Every capability qkio knows by name, with the kernel's answer."""
        return {cap.name: self.check_extension(cap) for cap in Cap}

    def get_vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``: bytes to mmap from a vCPU fd (``kvm_run`` and friends)."""
        return io.ioctl(self.fd, io.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self, max_entries: int = 256):
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID leaves KVM can present to a guest.

        Returns a ``kvm_cpuid2`` with ``nent`` set by the kernel; pass it to
        :meth:`Vcpu.set_cpuid2` as it is, or after editing entries.
        """
        buf = s.cpuid2_with(max_entries)
        io.ioctl(self.fd, io.KVM_GET_SUPPORTED_CPUID, buf)
        return buf

    def create_vm(self):
        """``KVM_CREATE_VM(0)``: a new VM with no memory and no vCPUs."""
        from .vm import Vm
        try:
            vm_fd = io.ioctl(self.fd, io.KVM_CREATE_VM, 0)
        except KvmError as e:
            hint = ("another hypervisor may own the CPU's virtualization extensions"
                    if e.errno == errno.EBUSY else "see dmesg for the kernel's reason")
            raise KvmUnavailable(f"KVM refused to create a VM ({e}); {hint}") from None
        return Vm(self, vm_fd)

    def close(self) -> None:
        """Close /dev/kvm (idempotent); VMs already created live on."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


#: Set (to anything but "" or "0") to make :func:`probe` answer "unusable" on a
#: machine with KVM, to try the no-KVM paths: skipped tests, the book from goldens.
NO_KVM_ENV = "QKIO_NO_KVM"


def probe(path: str = DEV_KVM) -> str | None:
    """Return None if KVM is usable here, else the reason it is not (one line).

    qkio's one answer to "can this machine run a guest?": the test suite's
    ``kvm`` marker, the chapters' ``qkio: {requires_kvm: true}`` front matter
    and the book build (conf.py) all ask it.  It asks the kernel, not the
    file system: ``/dev/kvm`` can exist and still be useless (no permission,
    a container without the device, ``KVM_CREATE_VM`` refused because
    another hypervisor holds the CPU's virtualization extensions), so it
    opens the device, checks the API version and creates and closes one VM.
    The reason names the cause, because "no KVM" alone sends people looking
    in the wrong place.  ``QKIO_NO_KVM=1`` in the environment answers
    "unusable" whatever the device says; the device's own answer is asked
    once per path and process.
    """
    if os.environ.get(NO_KVM_ENV, "") not in ("", "0"):
        return f"{NO_KVM_ENV} is set in the environment"
    return _probe_device(path)


@functools.lru_cache(maxsize=None)
def _probe_device(path: str) -> str | None:
    try:
        with Kvm(path) as kvm:
            vm = kvm.create_vm()
            vm.close()
    except KvmUnavailable as e:
        return str(e)
    return None
