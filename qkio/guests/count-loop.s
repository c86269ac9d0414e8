# count-loop: a counted loop of count=N iterations, no exits, then exit 33.
#
# Each iteration is exactly two instructions, `dec %ecx` and `jnz`, and
# touches no memory and no port, so between the start and the final write
# to isa-debug-exit the vCPU runs 2N guest instructions and KVM has no reason
# to leave the guest.  Timing two runs with different N and dividing the
# difference in instructions by the difference in time gives the number of
# guest instructions this host's KVM runs per second -- a measured figure,
# where a book could otherwise only assert how the host runs guest code.
# N is `count=N` on the command line (default 1000000); N=0 runs no loop.

        .include "multiboot.inc"
        .include "cmdline.inc"

        .set DEFAULT_COUNT, 1000000

        .globl _start
_start:
        enter_kernel
        mov     $count_key, %esi
        call    cmdline_number
        jnc     1f
        mov     $DEFAULT_COUNT, %eax
1:      mov     %eax, %ecx
        test    %ecx, %ecx
        jz      done
        .p2align 4
2:      dec     %ecx                    # the two instructions counted per iteration
        jnz     2b
done:
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm

        .section .rodata
count_key:
        .asciz  "count"
