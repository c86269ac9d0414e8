# flood: print N bytes on COM1 as fast as the UART lets us, then exit 33.
#
# N is `count=N` on the command line (default 10000).  The output is lines
# of 63 letters and a newline, so it is easy to check and kind to a
# terminal; the last line may be short.  Each byte is an IN from LSR and an
# OUT to THR: two exits, both taken by the vCPU thread.  This is the guest
# that shows whether the io thread stays asleep while a vCPU is busy -- it
# has nothing to do here, and must not spin.

        .include "multiboot.inc"
        .include "uart.inc"
        .include "cmdline.inc"

        .set DEFAULT_COUNT, 10000
        .set LINE, 64

        .globl _start
_start:
        enter_kernel
        mov     $count_key, %esi
        call    cmdline_number
        jnc     1f
        mov     $DEFAULT_COUNT, %eax
1:      mov     %eax, %ecx              # bytes left to print
        xor     %ebx, %ebx              # position in the line
        test    %ecx, %ecx
        jz      done
next:
        mov     $'\n', %al
        cmp     $LINE - 1, %ebx
        je      2f
        mov     %ebx, %eax
        xor     %edx, %edx
        push    %ecx
        mov     $26, %ecx
        div     %ecx
        pop     %ecx
        lea     'a'(%edx), %eax
2:      call    putc
        inc     %ebx
        and     $LINE - 1, %ebx
        dec     %ecx
        jnz     next
done:
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm

        .section .rodata
count_key:
        .asciz  "count"
