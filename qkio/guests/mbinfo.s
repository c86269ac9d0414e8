# mbinfo: dump the Multiboot information structure the loader built: the
# fixed fields, each module and each memory map entry.  The test suite runs
# it under QEMU to learn exactly what QEMU hands a kernel.

        .include "multiboot.inc"
        .include "uart.inc"

        .globl _start
_start:
        enter_kernel
        mov     %ebx, %edi              # %edi = the information structure

        mov     $s_magic, %esi
        call    puts
        call    puthex32
        mov     $s_info, %esi
        call    puts
        mov     %edi, %eax
        call    puthex32
        call    newline

        # The fixed part: fields 0..88 as 22 words, one per line.
        xor     %ebx, %ebx
1:      mov     $s_word, %esi
        call    puts
        mov     %ebx, %eax
        shl     $2, %eax
        call    puthex8
        mov     $s_eq, %esi
        call    puts
        mov     (%edi,%ebx,4), %eax
        call    puthex32
        call    newline
        inc     %ebx
        cmp     $22, %ebx
        jb      1b

        # Modules: start, end and command line of each.
        mov     20(%edi), %ecx          # mods_count
        mov     24(%edi), %ebx          # mods_addr
2:      test    %ecx, %ecx
        jz      3f
        mov     $s_mod, %esi
        call    puts
        mov     0(%ebx), %eax
        call    puthex32
        mov     $s_dash, %esi
        call    puts
        mov     4(%ebx), %eax
        call    puthex32
        mov     $s_quote, %esi
        call    puts
        mov     8(%ebx), %esi
        call    puts
        mov     $s_endquote, %esi
        call    puts
        add     $16, %ebx
        dec     %ecx
        jmp     2b

        # Memory map: entries of (size, base, length, type); size excludes
        # its own four bytes.
3:      mov     48(%edi), %ebx          # mmap_addr
        mov     44(%edi), %ecx          # mmap_length
        add     %ebx, %ecx              # %ecx = end of the map
4:      cmp     %ecx, %ebx
        jae     5f
        mov     $s_mmap, %esi
        call    puts
        mov     0(%ebx), %eax
        call    puthex32
        mov     $s_base, %esi
        call    puts
        mov     8(%ebx), %eax
        call    puthex32
        mov     4(%ebx), %eax
        call    puthex32
        mov     $s_len, %esi
        call    puts
        mov     16(%ebx), %eax
        call    puthex32
        mov     12(%ebx), %eax
        call    puthex32
        mov     $s_type, %esi
        call    puts
        mov     20(%ebx), %eax
        call    puthex32
        call    newline
        mov     0(%ebx), %eax
        lea     4(%ebx,%eax), %ebx
        jmp     4b

5:      mov     $s_loader, %esi
        call    puts
        mov     64(%edi), %esi
        call    puts
        mov     $s_endquote, %esi
        call    puts
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm

newline:
        push    %eax
        mov     $'\n', %al
        call    putc
        pop     %eax
        ret

        .section .rodata
s_magic:    .asciz "magic="
s_info:     .asciz " info="
s_word:     .asciz "mbi+"
s_eq:       .asciz "="
s_mod:      .asciz "module "
s_dash:     .asciz "-"
s_quote:    .asciz " '"
s_endquote: .asciz "'\n"
s_mmap:     .asciz "mmap size="
s_base:     .asciz " base="
s_len:      .asciz " len="
s_type:     .asciz " type="
s_loader:   .asciz "loader='"
