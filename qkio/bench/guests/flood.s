# flood: send N bytes to COM1 as fast as a polled 8250 driver can --
# wait for LSR.THRE, write THR, repeat -- then exit.  Each byte costs two
# exits: the IN from LSR and the OUT to THR.

        .include "multiboot.inc"

        .globl _start
_start:
        enter_kernel
        call    read_count
        mov     %eax, %ecx
        mov     $'a', %bl
        test    %ecx, %ecx
        jz      3f
1:      mov     $COM1_LSR, %dx
2:      inb     %dx, %al
        test    $LSR_THRE, %al
        jz      2b
        mov     $COM1, %dx
        mov     %bl, %al
        outb    %al, %dx
        inc     %bl                         # a..z, then a newline
        cmp     $'z' + 1, %bl
        jne     4f
        mov     $'\n', %bl
4:      cmp     $'\n' + 1, %bl
        jne     5f
        mov     $'a', %bl
5:      dec     %ecx
        jnz     1b
3:      xor     %eax, %eax
        jmp     debug_exit
