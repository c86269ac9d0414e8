# unassigned-mmio: load from a physical address nothing owns and print what came back.
#
# The address is 0xd0000000 (or addr=A, decimal), chosen from QEMU 7.2's
# microvm memory map with ACPI off (hw/i386/microvm.c; `info mtree -f`
# shows it): RAM from 0 (128 MiB by default; below 4 GiB at most 3 GiB,
# up to 0xc0000000), the virtio-mmio transports at 0xfeb00000, the IOAPIC
# at 0xfec00000, the local APIC at 0xfee00000, the BIOS at 0xffff0000.
# PCIe, whose MMIO window would cover 0xc0000000-0xdfffffff, exists only
# with ACPI.  So 0xd0000000 is nobody's on that machine, and nobody's on
# qkio's (RAM at 0, the same devices).  Every access to it is a
# KVM_EXIT_MMIO that the VMM answers for nobody.
#
# First it stores 8 bytes of 0x5a there, with an MMX move (the one 8-byte
# access a 32-bit guest has), so that a VMM that leaves kvm_run.mmio.data
# untouched on the reads that follow would give the 5a's back; then it
# loads 1, 2, 4 and 8 bytes and prints them as one line:
#
#     mmio 0xd0000000: 1=.. 2=.... 4=........ 8=................
#
# With count=N it then makes N more 4-byte loads there, ORs what they give
# and prints "count=N or=........": one line that says whether any of the
# N answers differed from zero -- QEMU 7.2's answer (unassigned_mem_read,
# softmmu/memory.c, returns 0).

        .include "multiboot.inc"
        .include "uart.inc"
        .include "cmdline.inc"

        .set DEFAULT_ADDR, 0xd0000000
        .set CR0_MP, 1 << 1
        .set CR0_EM, 1 << 2             # set: MMX and x87 instructions fault
        .set CR0_TS, 1 << 3             # set: they fault with #NM

        .globl _start
_start:
        enter_kernel
        # MMX needs CR0.EM and CR0.TS clear; the Multiboot state says nothing
        # about them.
        mov     %cr0, %eax
        and     $~(CR0_EM | CR0_TS), %eax
        or      $CR0_MP, %eax
        mov     %eax, %cr0
        mov     $addr_key, %esi
        call    cmdline_number
        jnc     1f
        mov     $DEFAULT_ADDR, %eax
1:      mov     %eax, %edi              # %edi: the address, for the whole run

        movq    pattern, %mm0
        movq    %mm0, (%edi)            # 8-byte store: dropped, if nobody owns it

        mov     $head, %esi
        call    puts
        mov     %edi, %eax
        call    puthex32
        mov     $size1, %esi
        call    puts
        movb    (%edi), %al             # 1 byte
        call    puthex8
        mov     $size2, %esi
        call    puts
        movw    (%edi), %ax             # 2 bytes
        call    puthex16
        mov     $size4, %esi
        call    puts
        movl    (%edi), %eax            # 4 bytes
        call    puthex32
        mov     $size8, %esi
        call    puts
        movq    (%edi), %mm0            # 8 bytes
        movq    %mm0, value         # no EMMS: no x87 code follows (and this
                                        # host's KVM fails to emulate one)
        mov     value + 4, %eax
        call    puthex32
        mov     value, %eax
        call    puthex32
        mov     $'\n', %al
        call    putc

        mov     $count_key, %esi
        call    cmdline_number
        jc      done
        mov     %eax, %ecx
        mov     %eax, %ebp              # N, to print
        xor     %ebx, %ebx              # the OR of every answer
        test    %ecx, %ecx
        jz      2f
3:      or      (%edi), %ebx            # one 4-byte load, one exit
        dec     %ecx
        jnz     3b
2:      mov     $count_key, %esi
        call    puts
        mov     $'=', %al
        call    putc
        mov     %ebp, %eax
        call    putdec
        mov     $or_text, %esi
        call    puts
        mov     %ebx, %eax
        call    puthex32
        mov     $'\n', %al
        call    putc
done:
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm

# puthex16: send %ax as four lower-case hex digits.  Preserves every register.
puthex16:
        push    %eax
        xchg    %al, %ah
        call    puthex8
        xchg    %al, %ah
        call    puthex8
        pop     %eax
        ret

        .section .rodata
        .p2align 3
pattern:
        .quad   0x5a5a5a5a5a5a5a5a
addr_key:
        .asciz  "addr"
count_key:
        .asciz  "count"
head:
        .asciz  "mmio 0x"
size1:
        .asciz  ": 1="
size2:
        .asciz  " 2="
size4:
        .asciz  " 4="
size8:
        .asciz  " 8="
or_text:
        .asciz  " or="

        .section .bss
        .p2align 3
value:
        .skip   8
