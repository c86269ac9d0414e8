# unassigned: read a port no device claims and print what came back.
# On a PC nothing drives the bus for such a read, so QEMU answers 0xff and
# this prints "ff"; a VMM that lets KVM's zero-filled buffer through would
# print "00".

        .include "multiboot.inc"
        .include "uart.inc"

        .set NOBODY_HOME, 0x1234

        .globl _start
_start:
        enter_kernel
        mov     $NOBODY_HOME, %dx
        inb     %dx, %al
        call    puthex8
        mov     $'\n', %al
        call    putc
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm
