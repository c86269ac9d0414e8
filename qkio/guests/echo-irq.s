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
# the guest and KVM emulates only the odd MMIO instruction -- but on this
# book's host (kvm_pvm) a protected-mode IRET in the guest ends the run with
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
        .include "pic.inc"

        .set SERIAL_IRQ, 4
        .set EXIT_EXCEPTION, 0x7e

        .globl _start
_start:
        enter_kernel
        call    load_gdt
        mov     $SERIAL_IRQ, %ebx
        mov     $serial_isr, %edx
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

