"""Numbers from <linux/kvm.h>: exit reasons, capabilities, flags (checked by the layout test)."""

import enum

KVM_API_VERSION = 12


class ExitReason(enum.IntEnum):
    """``kvm_run.exit_reason``: why ``KVM_RUN`` returned to userspace."""
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24


class Cap(enum.IntEnum):
    """``KVM_CHECK_EXTENSION`` arguments used by qkio."""
    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    SYNC_MMU = 16
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    IRQFD = 32
    PIT2 = 33
    MP_STATE = 14
    MAX_VCPUS = 66
    IMMEDIATE_EXIT = 136


# kvm_ioeventfd.flags (1 << kvm_ioeventfd_flag_nr_*)
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
# kvm_irqfd.flags
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
# kvm_pit_config.flags
KVM_PIT_SPEAKER_DUMMY = 1
# kvm_mp_state.mp_state
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
# kvm_run.internal.suberror
KVM_INTERNAL_ERROR_EMULATION = 1
