# hello: the smallest guest that proves a VMM can boot a Multiboot kernel
# and carry its output: one line on COM1, then exit status 33.

        .include "multiboot.inc"
        .include "serial.inc"

        .globl _start
_start:
        enter_kernel
        mov     $message, %esi
        call    puts
        mov     $0x10, %eax             # QEMU exits with (0x10 << 1) | 1 = 33
        jmp     debug_exit

        .section .rodata
message:
        .asciz  "Hello from a Multiboot kernel\n"
