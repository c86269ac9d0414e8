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
# `chunk=K` makes the guest its own stopwatch: the OUTs are done in
# N / K chunks of K (the N mod K left over go first, untimed), the time
# stamp counter is read before and after each chunk, and once the loop is
# over the guest prints, on COM1,
#
#     pio-loop: chunk=K cycles: C1 C2 ... Cm
#
# each Ci the TSC cycles chunk i took (4294967295 if it took more than
# 2^32 - 1).  The clock is the guest's own, so the figure is the same thing
# in any VMM -- no VMM's start-up or shutdown is in it -- and a chunk is
# short (K = 500 OUTs: a few ms here), so one run yields a distribution, not
# one number.  The two RDTSCs per chunk are all the timing adds to the loop
# (under kvm_pvm each is emulated, at about a quarter of an exit's cost:
# under 0.1 % of a chunk of 500); the instructions between them are the
# untimed loop's four.  At most
# MAX_CHUNKS chunks; more ends the run at once with status 3 and a message.
#
# `mmio=A` (decimal) makes every OUT a one-byte store to guest-physical
# address A instead (`movb %al, (A)`: one KVM_EXIT_MMIO each, where A is
# not RAM), timed the same way -- `qkio bench pio` compares an address
# nobody owns, 0xd0000000, in qkio and in QEMU (see unassigned-mmio.s for why
# that one).
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
        .include "uart.inc"

        .set POST_PORT, 0x80
        .set DEFAULT_COUNT, 10000
        .set MAX_CHUNKS, 4096
        .set EXIT_TOO_MANY, 0x01        # status 3

        .globl _start
_start:
        enter_kernel
        mov     $port_key, %esi
        call    cmdline_number
        jnc     1f
        mov     $POST_PORT, %eax
1:      mov     %eax, %ebp              # %ebp: the port (or address), all along
        mov     $mmio_key, %esi
        call    cmdline_number
        jc      9f
        mov     %eax, %ebp
        movb    $1, mmio
9:      mov     $chunk_key, %esi
        call    cmdline_number
        jnc     2f
        xor     %eax, %eax              # no chunk=: untimed
2:      mov     %eax, chunk
        mov     $count_key, %esi
        call    cmdline_number
        jnc     3f
        mov     $DEFAULT_COUNT, %eax
3:      mov     chunk, %ecx
        test    %ecx, %ecx
        jz      untimed
        xor     %edx, %edx
        div     %ecx                    # %eax: chunks, %edx: the rest
        cmp     $MAX_CHUNKS, %eax
        ja      too_many
        mov     %eax, chunks
        mov     %edx, %eax              # the rest first, untimed
untimed:
        mov     %eax, %ecx
        mov     %ebp, %edx
        call    outs
        cmpl    $0, chunk
        je      done

        xor     %edi, %edi              # %edi: the chunk being timed
4:      cmp     chunks, %edi
        jae     report
        cmpb    $0, mmio                # decided before the clock starts (no
        rdtsc                           # instruction below changes the flags)
        mov     %eax, %esi              # %ebx:%esi: the TSC at the start
        mov     %edx, %ebx
        mov     chunk, %ecx
        mov     %ebp, %edx
        jne     10f
5:      mov     %cl, %al                # the same four instructions as outs
        outb    %al, %dx
        dec     %ecx
        jnz     5b
        jmp     11f
10:     mov     %cl, %al                # ... and as its MMIO loop
        movb    %al, (%edx)
        dec     %ecx
        jnz     10b
11:     rdtsc
        sub     %esi, %eax
        sbb     %ebx, %edx
        jz      6f
        mov     $0xffffffff, %eax       # over 2^32 cycles: saturate
6:      mov     %eax, cycles(,%edi,4)
        inc     %edi
        jmp     4b

report:
        mov     $report_head, %esi
        call    puts
        mov     chunk, %eax
        call    putdec
        mov     $report_cycles, %esi
        call    puts
        xor     %edi, %edi
7:      cmp     chunks, %edi
        jae     8f
        mov     $' ', %al
        call    putc
        mov     cycles(,%edi,4), %eax
        call    putdec
        inc     %edi
        jmp     7b
8:      mov     $'\n', %al
        call    putc
done:
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm

too_many:
        mov     $too_many_msg, %esi
        call    puts
        mov     $EXIT_TOO_MANY, %eax
        jmp     exit_vmm

# outs: %ecx OUTs of the counter's low byte to port %dx (none if %ecx is 0);
# with mmio=, stores to address %edx.
outs:
        test    %ecx, %ecx
        jz      2f
        cmpb    $0, mmio
        jne     3f
1:      mov     %cl, %al                # counts down: N, N-1, ..., 1 (low bytes)
        outb    %al, %dx
        dec     %ecx
        jnz     1b
2:      ret
3:      mov     %cl, %al
        movb    %al, (%edx)
        dec     %ecx
        jnz     3b
        ret

        .section .rodata
count_key:
        .asciz  "count"
port_key:
        .asciz  "port"
mmio_key:
        .asciz  "mmio"
chunk_key:
        .asciz  "chunk"
report_head:
        .asciz  "pio-loop: chunk="
report_cycles:
        .asciz  " cycles:"
too_many_msg:
        .asciz  "pio-loop: more than 4096 chunks\n"

        .section .bss
        .p2align 2
chunk:
        .skip   4
chunks:
        .skip   4
mmio:
        .skip   1                       # 1: stores to an address, not OUTs
        .p2align 2
cycles:
        .skip   4 * MAX_CHUNKS
