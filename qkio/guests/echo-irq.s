# echo-irq: an interrupt-driven echo, the way a real serial driver works.
#
# Unlike a polling guest, this one spends its life asleep in HLT.  With
# KVM's in-kernel irqchip, HLT does not even exit to the VMM: the vCPU
# thread stays blocked inside KVM_RUN.  What wakes the guest is the io
# thread -- it sees the VMM's stdin readable in select(), hands the bytes
# to the UART model, and the UART raises IRQ 4 (KVM_IRQ_LINE) into the
# in-kernel 8259.  So every echoed byte travels: stdin -> io thread ->
# UART -> PIC -> this guest's ISR -> OUT to THR -> vCPU thread -> stdout.
#
# Set-up, in order:
#   1. our own GDT (IRET reloads CS from it) and an IDT;
#   2. reprogram the 8259 PICs with ICW1-4: IRQs 0-7 to vectors 0x20-0x27,
#      8-15 to 0x28-0x2f (the BIOS default, 0x08-0x0f, collides with CPU
#      exceptions), then mask every line but IRQ 4.  The in-kernel PIT
#      keeps ticking on IRQ 0; masked, it never bothers us;
#   3. program the UART: 8N1, OUT2 on, receive interrupts (IER.RDI) on.
#      Bytes that arrived before this point are waiting in the receive
#      FIFO, so enabling IER.RDI raises the line at once; the PIC latched
#      that edge in IRR and delivers it as soon as IRQ 4 is unmasked;
#   4. sti; hlt, forever.
#
# The ISR reads IIR (which acknowledges the UART's interrupt), then takes
# bytes while LSR.DR says one is waiting, echoes each one through THR, and
# sends the PIC an EOI.  After echoing 'q' it exits with value 0 (status 1).
#
# Returning from an interrupt without IRET.  KVM's x86 instruction emulator
# implements IRET for real mode only (emulate_iret: "iret from protected
# mode unimplemented yet").  On hardware that never matters -- the CPU runs
# the guest and KVM emulates only the odd MMIO instruction -- but on a host
# whose KVM interprets every instruction (qkio's development machine, see
# kvm-facts.md) a protected-mode IRET ends the run with
# KVM_EXIT_INTERNAL_ERROR.  So the handlers return with `sti; lret $4`:
# LRET pops EIP and CS and drops the saved EFLAGS, and STI sets IF again.
# That is exactly IRET here, because interrupts only ever arrive in the
# idle loop, where IF was set and no arithmetic flag is live; STI's
# one-instruction shadow covers the LRET, so no interrupt can nest before
# the frame is gone.
# Any CPU exception ends the run with value 0x7e (status 253) instead of
# a silent triple fault.

        .include "multiboot.inc"
        .include "uart.inc"
        .include "gdt.inc"

        .set PIC1_CMD, 0x20
        .set PIC1_DATA, 0x21
        .set PIC2_CMD, 0xa0
        .set PIC2_DATA, 0xa1
        .set ICW1_INIT_ICW4, 0x11       # edge-triggered, cascaded, ICW4 follows
        .set ICW4_8086, 0x01
        .set PIC_EOI, 0x20              # OCW2: non-specific end of interrupt
        .set IRQ_BASE, 0x20             # vector of IRQ 0
        .set SERIAL_IRQ, 4
        .set IDT_ENTRIES, 0x30          # exceptions 0x00-0x1f, IRQs 0x20-0x2f
        .set EXIT_EXCEPTION, 0x7e

        .globl _start
_start:
        enter_kernel
        call    load_gdt
        call    fill_idt
        lidt    idt_pointer
        call    init_pics
        call    init_uart
        mov     $banner, %esi
        call    puts
        # Unmask IRQ 4 only.  IRQ 2 (the cascade) stays masked: nothing on
        # the second PIC is wanted.
        mov     $~(1 << SERIAL_IRQ) & 0xff, %al
        outb    %al, $PIC1_DATA
idle:   sti                             # STI's one-instruction shadow: an interrupt
        hlt                             # cannot slip in between the two
        jmp     idle

# --- the interrupt descriptor table ---------------------------------------

# fill_idt: an interrupt gate (type 0xe: IF is cleared on entry) per vector.
# Exceptions go to `fault`, IRQ 4 to `serial_isr`, every other IRQ to
# `other_irq`.
fill_idt:
        xor     %ecx, %ecx
1:      mov     $fault, %eax
        cmp     $IRQ_BASE, %ecx
        jb      2f
        mov     $other_irq, %eax
        cmp     $IRQ_BASE + SERIAL_IRQ, %ecx
        jne     2f
        mov     $serial_isr, %eax
2:      mov     %ax, idt(,%ecx,8)               # offset 15:0
        movw    $KERNEL_CS, idt+2(,%ecx,8)      # selector
        movw    $0x8e00, idt+4(,%ecx,8)         # present, DPL 0, 32-bit interrupt gate
        shr     $16, %eax
        mov     %ax, idt+6(,%ecx,8)             # offset 31:16
        inc     %ecx
        cmp     $IDT_ENTRIES, %ecx
        jb      1b
        ret

# --- the 8259 pair ----------------------------------------------------------

init_pics:
        mov     $ICW1_INIT_ICW4, %al    # ICW1: start initialisation (clears IMR)
        outb    %al, $PIC1_CMD
        outb    %al, $PIC2_CMD
        mov     $IRQ_BASE, %al          # ICW2: vector base
        outb    %al, $PIC1_DATA
        mov     $IRQ_BASE + 8, %al
        outb    %al, $PIC2_DATA
        mov     $1 << 2, %al            # ICW3: the slave hangs off master IRQ 2 ...
        outb    %al, $PIC1_DATA
        mov     $2, %al                 # ... and knows it is cascade number 2
        outb    %al, $PIC2_DATA
        mov     $ICW4_8086, %al         # ICW4: 8086 mode, normal EOI
        outb    %al, $PIC1_DATA
        outb    %al, $PIC2_DATA
        mov     $0xff, %al              # OCW1: mask everything for now
        outb    %al, $PIC1_DATA
        outb    %al, $PIC2_DATA
        ret

# --- the UART ---------------------------------------------------------------

init_uart:
        mov     $LCR_8N1, %al
        mov     $COM1_LCR, %dx
        outb    %al, %dx
        mov     $MCR_DTR_RTS_OUT2, %al
        mov     $COM1_MCR, %dx
        outb    %al, %dx
        mov     $IER_RDI, %al
        mov     $COM1_IER, %dx
        outb    %al, %dx
        ret

# serial_isr: IRQ 4.  Entered through an interrupt gate, so IF is clear
# and the echo below cannot be interrupted by the next byte's IRQ; that
# byte's edge waits in the PIC's IRR and is delivered after the EOI.
serial_isr:
        push    %eax
        push    %edx
        mov     $COM1_IIR, %dx
        inb     %dx, %al                # acknowledge; the cause is "data ready"
1:      mov     $COM1_LSR, %dx
        inb     %dx, %al
        test    $LSR_DR, %al
        jz      2f
        mov     $COM1, %dx
        inb     %dx, %al                # RBR: the byte
        call    putc
        cmp     $'q', %al
        jne     1b
        xor     %eax, %eax              # 'q': value 0, status 1
        jmp     exit_vmm
2:      mov     $PIC_EOI, %al
        outb    %al, $PIC1_CMD
        pop     %edx
        pop     %eax
        sti                             # IRET, as the header explains
        lret    $4

# other_irq: an IRQ we never unmasked.  The one that can still arrive is a
# spurious IRQ 7, which the PIC sends without setting ISR and which must
# therefore get no EOI; nothing else is unmasked, so just return.
other_irq:
        sti
        lret    $4

# fault: a CPU exception.  Say so and stop, rather than triple-faulting.
fault:
        mov     $fault_message, %esi
        call    puts
        mov     $EXIT_EXCEPTION, %eax
        jmp     exit_vmm

        .section .rodata
banner:
        .asciz  "echo-irq: type; q quits\n"
fault_message:
        .asciz  "echo-irq: unexpected CPU exception\n"

        .p2align 2
        .word   0
idt_pointer:
        .word   IDT_ENTRIES * 8 - 1
        .long   idt

        .section .bss
        .p2align 3
idt:
        .skip   IDT_ENTRIES * 8
