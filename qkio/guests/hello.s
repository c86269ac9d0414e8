# hello: the smallest guest that says something.  It prints one line on
# COM1 (polling LSR.THRE before each byte) and stops the VMM through
# isa-debug-exit with value 0x10, so `qkio run --kernel hello` exits 33.

        .include "multiboot.inc"
        .include "uart.inc"

        .globl _start
_start:
        enter_kernel
        mov     $greeting, %esi
        call    puts
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm

        .section .rodata
greeting:
        .asciz  "Hello from qkio's guest\n"
