# pio-loop: N OUT instructions to port 0x80, then exit 33.
#
# N is `count=N` on the command line (default 10000); `port=P` (decimal)
# writes port P instead of 0x80 -- `qkio bench pio` uses it to compare a
# device's port (port=1023, the UART's scratch register) with a port nobody
# owns (port=1280, 0x500) in qkio and in QEMU.  Every OUT is one
# KVM_EXIT_IO round trip: guest -> kernel -> the vCPU thread's ioctl
# returns -> Python looks the port up -> KVM_RUN again.  That is the number
# the benchmarks divide by.
#
# Why port 0x80: it is the PC's POST-code port, which firmware and old
# kernels write to as an I/O delay.  Nothing in qkio owns it, so by default
# a write goes to the bus's unassigned-port path (it is dropped, and the
# first one is logged once on stderr), as QEMU drops writes to its ioport80.
# A benchmark that wants the cheapest dispatch, or wants to count the
# writes, registers its own device at 0x80 on `machine.bus` before the run.
# The value written is the low byte of the loop counter, so such a device
# can check that none was lost.

        .include "multiboot.inc"
        .include "cmdline.inc"

        .set POST_PORT, 0x80
        .set DEFAULT_COUNT, 10000

        .globl _start
_start:
        enter_kernel
        mov     $port_key, %esi
        call    cmdline_number
        jnc     1f
        mov     $POST_PORT, %eax
1:      mov     %eax, %edx              # %dx: the port (cmdline_number keeps %edx)
        mov     $count_key, %esi
        call    cmdline_number
        jnc     2f
        mov     $DEFAULT_COUNT, %eax
2:      mov     %eax, %ecx
        test    %ecx, %ecx
        jz      done
3:      mov     %cl, %al                # counts down: N, N-1, ..., 1 (low bytes)
        outb    %al, %dx
        dec     %ecx
        jnz     3b
done:
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm

        .section .rodata
count_key:
        .asciz  "count"
port_key:
        .asciz  "port"
