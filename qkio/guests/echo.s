# echo: copy every byte received on COM1 back out, by polling LSR bit 0.
# After echoing a 'q' it exits with value 0 (QEMU status 1).

        .include "multiboot.inc"
        .include "uart.inc"

        .globl _start
_start:
        enter_kernel
next_byte:
        mov     $COM1_LSR, %dx
1:      inb     %dx, %al
        test    $LSR_DR, %al
        jz      1b
        mov     $COM1, %dx
        inb     %dx, %al
        call    putc
        cmp     $'q', %al
        jne     next_byte
        xor     %eax, %eax
        jmp     exit_vmm
