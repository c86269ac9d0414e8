# spin: run forever without touching a port or memory.  With interrupts
# off the CPU never leaves the guest on its own: only the VMM can stop it,
# by kicking the vCPU thread out of KVM_RUN (--timeout, a signal, pause,
# run_on_cpu).  The test and book guest for everything that is about kicks.

        .include "multiboot.inc"

        .globl _start
_start:
        cli
1:      jmp     1b
