# spin: never exit, never touch a port.  The VMM has to stop this guest
# from outside (a timeout, a signal, a kick).

        .include "multiboot.inc"

        .globl _start
_start:
        cli
1:      jmp     1b
