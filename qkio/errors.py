"""The exceptions qkio raises on purpose.

Every failure a user can cause -- no /dev/kvm, a file that is not a kernel, a
guest that dies -- ends in one of these, with a message that says what went
wrong and, where there is one, what to do.  Anything else escaping is a bug.
"""


class QkioError(Exception):
    """Base class of every error qkio raises on purpose."""


class KvmUnavailable(QkioError):
    """/dev/kvm is missing, not accessible, or KVM refuses to create a VM."""


class KvmError(QkioError, OSError):
    """An ioctl on a KVM fd failed.  Carries the ioctl's name and the errno."""

    def __init__(self, ioctl_name: str, errno_: int, detail: str = ""):
        import errno
        import os

        self.ioctl_name = ioctl_name
        name = errno.errorcode.get(errno_, f"errno {errno_}")
        msg = f"{ioctl_name} failed: {name} ({os.strerror(errno_)})"
        if detail:
            msg += f": {detail}"
        OSError.__init__(self, errno_, msg)

    def __str__(self) -> str:  # OSError's default adds "[Errno N]" noise
        return self.args[1]


class GuestMemoryError(QkioError, ValueError):
    """A read or write would fall outside guest memory."""


class BadKernel(QkioError, ValueError):
    """The file given as a kernel cannot be loaded (not ELF, not Multiboot, truncated...)."""


class GuestFailure(QkioError):
    """The guest ended abnormally: triple fault, emulation failure, failed entry."""


class MachineStateError(QkioError, RuntimeError):
    """A :class:`qkio.machine.Machine` method was called in a state, or from a
    thread, where it has no meaning (see the lifecycle in ``Machine``'s docstring)."""
