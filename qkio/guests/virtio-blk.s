# virtio-blk: find a virtio-blk disk on virtio-mmio, write sectors, read them
# back, check them, say so on COM1, exit 33 (35 if anything went wrong).
#
# The same file runs on `qkio run --drive file=IMG` and on QEMU's microvm
# (`-global virtio-mmio.force-legacy=false -device virtio-blk-device,...`).
# It speaks only virtio 1.x (register layout version 2) and keeps one
# request in flight.  It waits for each one by polling the used ring with
# interrupts off, or, with irq=1 on the command line, by sleeping in HLT
# until the device's interrupt (IRQ 12 through the 8259 pair, acknowledged
# with a write to InterruptACK and an EOI to both PICs).
#
#   1. Probe the eight transports of microvm's window (0xfeb00000, 512 bytes
#      apart) for MagicValue "virt", Version 2, DeviceID 2.  QEMU puts its
#      first device on the last one, so probing beats assuming a slot.
#   2. The driver initialisation of section 3.1.1 of the specification:
#      reset, ACKNOWLEDGE, DRIVER, read the features, accept only
#      VIRTIO_F_VERSION_1 (bit 32), FEATURES_OK (and check it stuck), set up
#      queue 0 with QSIZE entries, DRIVER_OK.
#   3. count=N requests pairs (default 8): OUT a sector of a pattern made
#      from the request number, IN it back into a zeroed buffer, compare.
#      Sector i % capacity.  Each request is three descriptors -- header
#      (device-readable), data, status byte (device-writable) -- made
#      available, then a write of 0 to QueueNotify; the guest then spins on
#      used.idx in RAM, which costs no exit.
#   4. One FLUSH and one GET_ID; print the serial.
#   5. Print counts, a checksum of everything read back, and the TSC cycles
#      per write+read pair; exit through isa-debug-exit.

        .include "multiboot.inc"
        .include "uart.inc"
        .include "cmdline.inc"
        .include "gdt.inc"
        .include "pic.inc"

        .set WINDOW,        0xfeb00000  # microvm's VIRTIO_MMIO_BASE
        .set TRANSPORTS,    8
        .set STRIDE,        0x200
        .set MAGIC,         0x74726976  # "virt"
        .set QSIZE,         8
        .set DEFAULT_COUNT, 8
        .set EXIT_FAILED,   0x11        # status 35

        # Register offsets (virtio 1.x, section 4.2.2)
        .set R_MAGIC, 0x000
        .set R_VERSION, 0x004
        .set R_DEVICE_ID, 0x008
        .set R_DEV_FEAT, 0x010
        .set R_DEV_FEAT_SEL, 0x014
        .set R_DRV_FEAT, 0x020
        .set R_DRV_FEAT_SEL, 0x024
        .set R_QUEUE_SEL, 0x030
        .set R_QUEUE_NUM_MAX, 0x034
        .set R_QUEUE_NUM, 0x038
        .set R_QUEUE_READY, 0x044
        .set R_QUEUE_NOTIFY, 0x050
        .set R_STATUS, 0x070
        .set R_DESC_LO, 0x080
        .set R_DESC_HI, 0x084
        .set R_AVAIL_LO, 0x090
        .set R_AVAIL_HI, 0x094
        .set R_USED_LO, 0x0a0
        .set R_USED_HI, 0x0a4
        .set R_CONFIG, 0x100            # virtio_blk_config.capacity (le64)

        .set S_ACK, 1
        .set S_DRIVER, 2
        .set S_DRIVER_OK, 4
        .set S_FEATURES_OK, 8

        .set R_INTERRUPT_ACK, 0x064

        .set VIRTIO_IRQ, 12             # transport 7's GSI on microvm (5 + 7)
        .set LAPIC_SVR, 0xfee000f0      # spurious-interrupt vector register
        .set LAPIC_LVT0, 0xfee00350     # local vector table: LINT0
        .set EXIT_EXCEPTION, 0x7e

        .set T_IN, 0
        .set T_OUT, 1
        .set T_FLUSH, 4
        .set T_GET_ID, 8
        .set F_NEXT, 1
        .set F_WRITE, 2

        .globl _start
_start:
        enter_kernel
        mov     $count_key, %esi
        call    cmdline_number
        jnc     1f
        mov     $DEFAULT_COUNT, %eax
1:      mov     %eax, count
        mov     $irq_key, %esi
        call    cmdline_number
        jc      1f
        mov     %eax, irq_mode
        test    %eax, %eax
        jz      1f
        call    load_gdt
        call    setup_interrupts
1:

# --- 1. probe -------------------------------------------------------------
        mov     $WINDOW, %ebp
        mov     $TRANSPORTS, %ecx
probe:
        cmpl    $MAGIC, R_MAGIC(%ebp)
        jne     2f
        cmpl    $2, R_VERSION(%ebp)
        jne     2f
        cmpl    $2, R_DEVICE_ID(%ebp)
        je      found
2:      add     $STRIDE, %ebp
        loop    probe
        mov     $msg_nodev, %esi
        jmp     fail

found:
        mov     $msg_found, %esi
        call    puts
        mov     %ebp, %eax
        call    puthex
        call    newline

# --- 2. initialise (section 3.1.1) ---------------------------------------
        movl    $0, R_STATUS(%ebp)
        movl    $S_ACK, R_STATUS(%ebp)
        movl    $S_ACK|S_DRIVER, R_STATUS(%ebp)
        movl    $1, R_DEV_FEAT_SEL(%ebp)
        testl   $1, R_DEV_FEAT(%ebp)            # bit 32: VIRTIO_F_VERSION_1
        mov     $msg_nov1, %esi
        jz      fail
        movl    $1, R_DRV_FEAT_SEL(%ebp)
        movl    $1, R_DRV_FEAT(%ebp)
        movl    $0, R_DRV_FEAT_SEL(%ebp)
        movl    $0, R_DRV_FEAT(%ebp)
        movl    $S_ACK|S_DRIVER|S_FEATURES_OK, R_STATUS(%ebp)
        testl   $S_FEATURES_OK, R_STATUS(%ebp)
        mov     $msg_features, %esi
        jz      fail
        movl    $0, R_QUEUE_SEL(%ebp)
        cmpl    $QSIZE, R_QUEUE_NUM_MAX(%ebp)
        mov     $msg_queue, %esi
        jb      fail
        movl    $QSIZE, R_QUEUE_NUM(%ebp)
        movl    $desc, R_DESC_LO(%ebp)
        movl    $0, R_DESC_HI(%ebp)
        movl    $avail, R_AVAIL_LO(%ebp)
        movl    $0, R_AVAIL_HI(%ebp)
        movl    $used, R_USED_LO(%ebp)
        movl    $0, R_USED_HI(%ebp)
        movl    $1, R_QUEUE_READY(%ebp)
        movl    $S_ACK|S_DRIVER|S_FEATURES_OK|S_DRIVER_OK, R_STATUS(%ebp)
        mov     R_CONFIG(%ebp), %eax            # capacity, low half (the disk is small)
        mov     %eax, capacity
        mov     $msg_capacity, %esi
        call    puts
        call    putdec
        call    newline
        test    %eax, %eax
        mov     $msg_empty, %esi
        jz      fail

# --- 3. count write+read pairs ------------------------------------------
        rdtsc
        mov     %eax, tsc_start
        mov     %edx, tsc_start+4
        xor     %ebx, %ebx                      # request pair number i
pairs:
        cmp     count, %ebx
        jae     pairs_done
        xor     %edx, %edx                      # sector = i % capacity
        mov     %ebx, %eax
        divl    capacity
        mov     %edx, sector
        # the pattern: dword j of pair i is i * 0x01000193 + j
        mov     $wbuf, %edi
        mov     %ebx, %eax
        imul    $0x01000193, %eax, %eax
        mov     $128, %ecx
3:      stosl
        inc     %eax
        loop    3b
        mov     $T_OUT, %eax
        mov     $wbuf, %esi
        mov     $512, %ecx
        xor     %edx, %edx                      # data is device-readable
        call    request
        jc      bad_status
        incl    writes
        # zero the read buffer, read the sector back
        mov     $rbuf, %edi
        xor     %eax, %eax
        mov     $128, %ecx
        rep     stosl
        mov     $T_IN, %eax
        mov     $rbuf, %esi
        mov     $512, %ecx
        mov     $F_WRITE, %edx
        call    request
        jc      bad_status
        incl    reads
        # checksum what came back, then compare with what went out
        mov     $rbuf, %esi
        mov     $128, %ecx
4:      lodsl
        add     %eax, checksum
        loop    4b
        mov     $wbuf, %esi
        mov     $rbuf, %edi
        mov     $128, %ecx
        repe    cmpsl
        jne     5f
        incl    verified
5:      inc     %ebx
        jmp     pairs
bad_status:
        incl    errors
        inc     %ebx
        jmp     pairs
pairs_done:
        rdtsc
        sub     tsc_start, %eax
        sbb     tsc_start+4, %edx
        mov     %eax, tsc_total
        mov     %edx, tsc_total+4

# --- 4. FLUSH and GET_ID ---------------------------------------------------
        movl    $0, sector
        mov     $T_FLUSH, %eax
        xor     %ecx, %ecx                      # no data
        call    request
        jnc     6f
        incl    errors
6:      mov     $T_GET_ID, %eax
        mov     $idbuf, %esi
        mov     $20, %ecx
        mov     $F_WRITE, %edx
        call    request
        jnc     7f
        incl    errors
7:      mov     $msg_id, %esi
        call    puts
        mov     $idbuf, %esi
        call    puts                            # idbuf has a 21st byte, always 0
        call    newline

# --- 5. report --------------------------------------------------------------
        mov     $msg_writes, %esi
        call    puts
        mov     writes, %eax
        call    putdec
        mov     $msg_reads, %esi
        call    puts
        mov     reads, %eax
        call    putdec
        mov     $msg_verified, %esi
        call    puts
        mov     verified, %eax
        call    putdec
        mov     $msg_errors, %esi
        call    puts
        mov     errors, %eax
        call    putdec
        call    newline
        mov     $msg_checksum, %esi
        call    puts
        mov     checksum, %eax
        call    puthex
        call    newline
        cmpl    $0, irq_mode
        je      9f
        mov     $msg_irqs, %esi
        call    puts
        mov     irqs, %eax
        call    putdec
        call    newline
9:      mov     $msg_cycles, %esi
        call    puts
        mov     count, %ecx
        mov     tsc_total, %eax
        mov     tsc_total+4, %edx
        test    %ecx, %ecx
        jz      8f
        cmp     %ecx, %edx                      # quotient must fit 32 bits
        jae     8f
        div     %ecx
8:      call    putdec
        call    newline
        mov     errors, %eax
        test    %eax, %eax
        jnz     failed_quietly
        mov     verified, %eax
        cmp     count, %eax
        jne     failed_quietly
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm

fail:   call    puts
failed_quietly:
        mov     $EXIT_FAILED, %eax
        jmp     exit_vmm

# request: one request of type %eax on `sector`, data %ecx bytes at %esi
# (none if %ecx is 0), data descriptor flags %edx (0 or F_WRITE).  Waits
# for the device to return it.  CF set if the status byte is not OK.
# Preserves %ebx and %ebp.
request:
        mov     %eax, hdr_type
        movl    $0, hdr_reserved
        mov     sector, %eax
        mov     %eax, hdr_sector
        movl    $0, hdr_sector+4
        movb    $0xff, status                   # the device must overwrite it
        # descriptor 0: the header
        movl    $hdr, desc
        movl    $0, desc+4
        movl    $16, desc+8
        movw    $F_NEXT, desc+12
        test    %ecx, %ecx
        jz      1f
        # descriptor 1: the data; 2: the status byte
        movw    $1, desc+14
        mov     %esi, desc+16
        movl    $0, desc+20
        mov     %ecx, desc+24
        or      $F_NEXT, %edx
        mov     %dx, desc+28
        movw    $2, desc+30
        mov     $desc+32, %edi
        jmp     2f
1:      movw    $2, desc+14                     # FLUSH: header, then status
        mov     $desc+32, %edi
2:      movl    $status, (%edi)
        movl    $0, 4(%edi)
        movl    $1, 8(%edi)
        movw    $F_WRITE, 12(%edi)
        movw    $0, 14(%edi)
        # make chain 0 available, then tell the device
        movzwl  avail+2, %eax
        mov     %eax, %edx
        and     $QSIZE-1, %edx
        movw    $0, avail+4(,%edx,2)
        inc     %eax
        mov     %ax, avail+2                    # after the ring entry (x86 keeps stores in order)
        movl    $0, R_QUEUE_NOTIFY(%ebp)
        # wait for used.idx to move
        incw    last_used
        mov     last_used, %ax
3:      cmp     used+2, %ax
        je      5f
        cmpl    $0, irq_mode
        jne     6f
        pause
        jmp     3b
6:      sti                             # STI's shadow covers HLT: an interrupt
        hlt                             # pending now wakes the HLT, never lost
        cli
        jmp     3b
5:      cmpl    $0, irq_mode
        je      7f
        # Done, whether or not the interrupt was taken: acknowledge it, so the
        # line falls and the next completion is a new edge for the PIC.
        movl    $1, R_INTERRUPT_ACK(%ebp)
7:
        cmpb    $0, status
        jne     4f
        clc
        ret
4:      stc
        ret

# setup_interrupts: an IDT whose IRQ 12 vector is virtio_isr (pic.inc), the PICs
# remapped to 0x20/0x28, everything masked but IRQ 12 and the cascade.
setup_interrupts:
        mov     $VIRTIO_IRQ, %ebx
        mov     $virtio_isr, %edx
        call    fill_idt
        lidt    idt_pointer
        call    init_pics
        mov     $~(1 << 2) & 0xff, %al          # master: only the cascade
        outb    %al, $PIC1_DATA
        mov     $~(1 << (VIRTIO_IRQ - 8)) & 0xff, %al   # slave: only IRQ 12
        outb    %al, $PIC2_DATA
        # The PIC reaches the CPU through the local APIC's LINT0, which must be
        # unmasked in ExtINT mode.  qkio and QEMU's -M pc firmware set that up;
        # QEMU's microvm leaves it to the guest.  So: APIC software-enabled
        # (spurious vector 0x2f, which other_irq takes), LVT0 = ExtINT.
        movl    $0x100 | (IRQ_BASE + 15), LAPIC_SVR
        movl    $0x700, LAPIC_LVT0
        ret

# virtio_isr: count, and EOI both PICs.  The device's InterruptStatus is
# acknowledged by `request` once it sees the used ring move, interrupt or
# not (QEMU's line is level-triggered: until acknowledged it stays up, and
# the PIC sees no new edge for the next completion).  Returns with
# `sti; lret $4` rather than IRET, for the reason echo-irq.s gives (this
# host's KVM cannot emulate a protected-mode IRET); interrupts only arrive
# in the HLT of `request`.
virtio_isr:
        push    %eax
        incl    irqs
        mov     $PIC_EOI, %al
        outb    %al, $PIC2_CMD
        outb    %al, $PIC1_CMD
        pop     %eax
        sti
        lret    $4

other_irq:                                      # a spurious IRQ 7 or 15: no EOI
        sti
        lret    $4

fault:
        mov     $msg_fault, %esi
        jmp     fail

# puthex: %eax as 0x and eight hex digits.  Preserves every register.
puthex:
        push    %eax
        mov     $'0', %al
        call    putc
        mov     $'x', %al
        call    putc
        pop     %eax
        jmp     puthex32

newline:
        push    %eax
        mov     $'\n', %al
        call    putc
        pop     %eax
        ret

        .section .rodata
count_key:      .asciz "count"
irq_key:        .asciz "irq"
msg_irqs:       .asciz "virtio-blk: interrupts "
msg_fault:      .asciz "virtio-blk: CPU exception\n"
msg_found:      .asciz "virtio-blk: found at "
msg_capacity:   .asciz "virtio-blk: capacity (sectors) "
msg_id:         .asciz "virtio-blk: id "
msg_writes:     .asciz "virtio-blk: writes "
msg_reads:      .asciz " reads "
msg_verified:   .asciz " verified "
msg_errors:     .asciz " errors "
msg_checksum:   .asciz "virtio-blk: checksum "
msg_cycles:     .asciz "virtio-blk: tsc cycles per write+read "
msg_nodev:      .asciz "virtio-blk: no virtio-mmio version 2 block device in 0xfeb00000..0xfeb00fff\n"
msg_nov1:       .asciz "virtio-blk: device does not offer VIRTIO_F_VERSION_1\n"
msg_features:   .asciz "virtio-blk: device refused FEATURES_OK\n"
msg_queue:      .asciz "virtio-blk: queue 0 is too small\n"
msg_empty:      .asciz "virtio-blk: the disk is empty\n"

        .data
        .p2align 2
count:          .long 0
irq_mode:       .long 0
irqs:           .long 0
capacity:       .long 0
sector:         .long 0
writes:         .long 0
reads:          .long 0
verified:       .long 0
errors:         .long 0
checksum:       .long 0
tsc_start:      .quad 0
tsc_total:      .quad 0
last_used:      .word 0
status:         .byte 0
        .p2align 4
hdr:
hdr_type:       .long 0
hdr_reserved:   .long 0
hdr_sector:     .quad 0
idbuf:          .skip 21

        .section .bss
        .p2align 12
desc:           .skip 16*QSIZE                  # 16-byte aligned
        .p2align 8
avail:          .skip 6+2*QSIZE                 # 2-byte aligned
        .p2align 8
used:           .skip 6+8*QSIZE                 # 4-byte aligned
        .p2align 4
wbuf:           .skip 512
rbuf:           .skip 512
