# pio: N one-byte OUTs to one port, then exit -- one KVM_EXIT_IO per OUT.
#
# The loop is three instructions (out, dec, jnz), so nearly all of the time
# per iteration is the exit round trip: guest -> KVM -> the VMM's KVM_RUN
# returns -> the VMM handles the OUT -> KVM_RUN again -> guest.
# Port 0x80 is the PC's POST-code port: QEMU's "ioport80" swallows writes;
# the benchmarks put a do-nothing device there in qkio.  Under
# KVM_IOEVENTFD (bench ioeventfd) the same OUTs never leave the kernel.

        .include "multiboot.inc"

        .set BENCH_PORT, 0x80

        .globl _start
_start:
        enter_kernel
        call    read_count
        mov     %eax, %ecx
        mov     $BENCH_PORT, %dx
        xor     %eax, %eax
        test    %ecx, %ecx
        jz      2f
1:      outb    %al, %dx
        dec     %ecx
        jnz     1b
2:      xor     %eax, %eax                  # status (0 << 1) | 1 = 1
        jmp     debug_exit
