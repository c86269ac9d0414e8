# cmdline: print the command line the loader put in the Multiboot
# information structure, between quotes so that a trailing space shows.
# This is how the test suite learns QEMU's exact format.

        .include "multiboot.inc"
        .include "uart.inc"

        .globl _start
_start:
        enter_kernel
        cmp     $MB_INFO_MAGIC, %eax
        jne     not_multiboot
        testl   $MBI_HAS_CMDLINE, MBI_FLAGS(%ebx)
        jz      no_cmdline

        mov     $prefix, %esi
        call    puts
        mov     MBI_CMDLINE(%ebx), %esi
        call    puts
        mov     $suffix, %esi
        call    puts
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm

not_multiboot:
        mov     $bad_magic, %esi
        call    puts
        mov     $0x11, %eax
        jmp     exit_vmm

no_cmdline:
        mov     $missing, %esi
        call    puts
        mov     $0x12, %eax
        jmp     exit_vmm

        .section .rodata
prefix:    .asciz "cmdline='"
suffix:    .asciz "'\n"
bad_magic: .asciz "not booted by a Multiboot loader\n"
missing:   .asciz "no command line\n"
