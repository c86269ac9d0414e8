# triple: die by triple fault.  With an IDT whose limit is zero, the divide
# error (#DE) cannot find its gate, so it becomes #GP; the #GP cannot find
# its gate either (#DF), and the #DF has nowhere to go: the CPU shuts down,
# which KVM reports as KVM_EXIT_SHUTDOWN.  int3 is a second way down.  The
# divide comes first because the kvm_pvm emulator on qkio's development
# machine cannot execute int3 at all (KVM_EXIT_INTERNAL_ERROR, emulation).

        .include "multiboot.inc"

        .globl _start
_start:
        cli
        lidt    empty_idt
        xor     %ecx, %ecx
        mov     $1, %eax
        div     %ecx
        int3
1:      hlt
        jmp     1b

        .section .rodata
        .p2align 2
empty_idt:
        .word   0                       # limit: not even one byte
        .long   0                       # base
