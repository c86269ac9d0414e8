"""qkio: a small KVM virtual machine monitor, written to be read.

qkio re-creates the threading design of qemu-kvm 0.12 (an io thread running a
select-based ``main_loop_wait``, one thread per vCPU in ``KVM_RUN``, an event
notifier and a signal pipe) on top of a thin layer over ``/dev/kvm``.
"""

#: qkio's one version number; pyproject.toml reads it from here (setuptools' dynamic "attr").
__version__ = "0.1.0"
