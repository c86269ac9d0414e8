# smp: start the other CPUs the way firmware does, then keep them all busy.
#
# A PC comes out of reset with one CPU running, the bootstrap processor
# (BSP); the others (application processors, APs) sit in the "wait for
# SIPI" state.  Under KVM the AP's vCPU thread is already inside KVM_RUN,
# blocked in the kernel until its local APIC gets a Startup IPI.  The BSP
# wakes them as SeaBIOS and Linux do:
#
#   1. read how many CPUs there are from fw_cfg (FW_CFG_NB_CPUS), as SeaBIOS;
#   2. copy a real-mode trampoline to a page below 1 MiB (0x8000): an AP
#      starts in real mode at CS:IP = (vector << 8):0, i.e. at physical
#      address vector << 12, so its first instructions must be there;
#   3. software-enable the local APIC (SVR bit 8) and write the interrupt
#      command register (ICR, 0xfee00300/0xfee00310) three times: INIT,
#      then SIPI twice with vector 0x08, each sent to "all excluding self".
#      KVM's in-kernel LAPIC handles these MMIO writes without an exit to
#      the VMM; the second SIPI is for CPUs that missed the first (real
#      hardware needs it now and then, KVM ignores it once the AP runs);
#   4. wait until every AP has checked in (a `lock incl` of ap_running).
#
# The trampoline loads the guest's GDT, sets CR0.PE and far-jumps into
# 32-bit code in the kernel at 1 MiB, where the AP finds its APIC ID in its
# local APIC (0xfee00020, bits 31:24) and takes its own stack.
#
# Then every CPU counts in its own slot of `counters`, and every 256
# iterations writes its APIC ID to port 0x501.  No device owns that port,
# so the write costs a KVM_EXIT_IO on that CPU's thread and is dropped
# (logged once) -- which is the point: the VMM sees both vCPU threads
# taking exits at the same time.  The BSP stops after `count=N`
# iterations (default 100000; rounded up to a multiple of 256), prints
# every CPU's count and exits 33.  `count=0` runs until the VMM stops it.
# If not every AP checks in, the BSP says so and exits 35.

        .include "multiboot.inc"
        .include "uart.inc"
        .include "cmdline.inc"
        .include "gdt.inc"

        .set DEFAULT_COUNT, 100000
        .set MAX_CPUS, 64               # qkio's --smp limit; sizes the arrays
        .set AP_STACK_SIZE, 1024
        .set HEARTBEAT, 256             # iterations between two port writes
        .set HEARTBEAT_PORT, 0x501
        .set EXIT_NO_AP, 0x11           # status 35
        .set AP_WAIT_LOOPS, 5000000     # a few seconds on an interpreting KVM

        .set FW_CFG_SELECTOR, 0x510
        .set FW_CFG_DATA, 0x511
        .set FW_CFG_NB_CPUS, 0x05

        .set APIC_BASE, 0xfee00000
        .set APIC_ID, APIC_BASE + 0x20
        .set APIC_SVR, APIC_BASE + 0xf0
        .set APIC_ICR_LOW, APIC_BASE + 0x300
        .set APIC_ICR_HIGH, APIC_BASE + 0x310
        .set SVR_ENABLE, 0x100
        .set ICR_BUSY, 1 << 12          # delivery status: still being sent
        .set ICR_ALL_BUT_SELF, 3 << 18  # destination shorthand
        .set ICR_ASSERT, 1 << 14
        .set ICR_INIT, 5 << 8
        .set ICR_STARTUP, 6 << 8

        .set TRAMPOLINE, 0x8000         # below 1 MiB, page aligned, free in qkio's layout
        .set SIPI_VECTOR, TRAMPOLINE >> 12

        .globl _start
_start:
        enter_kernel
        call    load_gdt
        mov     $count_key, %esi
        call    cmdline_number
        jnc     1f
        mov     $DEFAULT_COUNT, %eax
1:      mov     %eax, iterations

        call    read_nb_cpus
        mov     %eax, nb_cpus

        # The trampoline, to where the SIPI vector points.
        mov     $trampoline_start, %esi
        mov     $TRAMPOLINE, %edi
        mov     $trampoline_end - trampoline_start, %ecx
        rep movsb

        # Wake the APs: INIT, SIPI, SIPI.
        orl     $SVR_ENABLE | 0xff, APIC_SVR     # enabled, spurious vector 0xff
        movl    $0, APIC_ICR_HIGH                # destination: unused with a shorthand
        mov     $ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT, %eax
        call    send_ipi
        mov     $ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | SIPI_VECTOR, %eax
        call    send_ipi
        call    send_ipi

        # Wait for every AP to check in.
        mov     nb_cpus, %edx
        dec     %edx                    # APs expected
        mov     $AP_WAIT_LOOPS, %ecx
2:      cmp     %edx, ap_running
        jae     3f
        dec     %ecx
        jnz     2b
        mov     $msg_missing, %esi
        call    puts
        mov     ap_running, %eax
        inc     %eax
        call    putdec
        mov     $msg_of, %esi
        call    puts
        mov     nb_cpus, %eax
        call    putdec
        mov     $msg_started, %esi
        call    puts
        mov     $EXIT_NO_AP, %eax
        jmp     exit_vmm

3:      mov     $msg_smp, %esi
        call    puts
        mov     nb_cpus, %eax
        call    putdec
        mov     $msg_running, %esi
        call    puts

        # The BSP counts too, up to `iterations` (0: forever).
        mov     APIC_ID, %ebx
        shr     $24, %ebx
        mov     iterations, %ecx
        call    count

        # Report what each CPU managed (the APs are still counting).
        xor     %ebx, %ebx
4:      mov     $msg_cpu, %esi
        call    puts
        mov     %ebx, %eax
        call    putdec
        mov     $msg_colon, %esi
        call    puts
        mov     counters(,%ebx,4), %eax
        call    putdec
        mov     $'\n', %al
        call    putc
        inc     %ebx
        cmp     nb_cpus, %ebx
        jb      4b
        mov     $EXIT_DONE, %eax
        jmp     exit_vmm

# count: add one to counters[%ebx] over and over; every HEARTBEAT
# iterations write %bl (this CPU's APIC ID) to HEARTBEAT_PORT, and return
# once the count has reached %ecx (never, if %ecx is 0).
count:
        mov     $HEARTBEAT_PORT, %dx
1:      incl    counters(,%ebx,4)
        mov     counters(,%ebx,4), %eax
        test    $HEARTBEAT - 1, %eax
        jnz     1b
        push    %eax
        mov     %bl, %al
        outb    %al, %dx
        pop     %eax
        test    %ecx, %ecx
        jz      1b
        cmp     %ecx, %eax
        jb      1b
        ret

# send_ipi: write %eax to the ICR's low half (which sends the IPI) and wait
# until the local APIC says it has gone.  Preserves every register.
send_ipi:
        mov     %eax, APIC_ICR_LOW
1:      testl   $ICR_BUSY, APIC_ICR_LOW
        jnz     1b
        ret

# read_nb_cpus: the number of CPUs the VMM created, from fw_cfg item 0x05
# (a little-endian 16-bit value; select it, then read two bytes).
read_nb_cpus:
        push    %edx
        mov     $FW_CFG_NB_CPUS, %ax
        mov     $FW_CFG_SELECTOR, %dx
        outw    %ax, %dx
        mov     $FW_CFG_DATA, %dx
        xor     %eax, %eax
        inb     %dx, %al
        mov     %al, %ah
        inb     %dx, %al
        xchg    %al, %ah                # first byte is the low one
        cmp     $MAX_CPUS, %eax         # no fw_cfg (reads as 0 or 0xffff)? be modest
        jbe     1f
        mov     $1, %eax
1:      test    %eax, %eax
        jnz     2f
        inc     %eax
2:      pop     %edx
        ret

# --- the AP's way in ----------------------------------------------------------

# The trampoline: copied to TRAMPOLINE and entered there in real mode by
# each AP, with CS = SIPI_VECTOR << 8 and IP = 0.  Everything in it must be
# addressed relative to its start, through a segment with that base.
        .code16
trampoline_start:
        cli
        mov     %cs, %ax
        mov     %ax, %ds
        lgdtl   trampoline_gdt_pointer - trampoline_start
        mov     %cr0, %eax
        or      $1, %eax                # PE: protected mode, still no paging
        mov     %eax, %cr0
        ljmpl   $KERNEL_CS, $ap_entry   # 32-bit far jump, into the kernel at 1 MiB
        .p2align 2
trampoline_gdt_pointer:                 # a 32-bit base: LGDTL loads all of it
        .word   gdt_end - gdt - 1
        .long   gdt
trampoline_end:
        .code32

ap_entry:
        mov     $KERNEL_DS, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        mov     APIC_ID, %ebx
        shr     $24, %ebx
        cmp     $MAX_CPUS, %ebx         # no slot for it: park
        jae     2f
        lea     1(%ebx), %eax
        imul    $AP_STACK_SIZE, %eax, %eax
        lea     ap_stacks(%eax), %esp
        lock incl ap_running
        xor     %ecx, %ecx              # count forever
        call    count
2:      cli
        hlt
        jmp     2b

        .section .rodata
count_key:      .asciz  "count"
msg_smp:        .asciz  "smp: running on "
msg_running:    .asciz  " CPU(s)\n"
msg_missing:    .asciz  "smp: only "
msg_of:         .asciz  " of "
msg_started:    .asciz  " CPUs started\n"
msg_cpu:        .asciz  "cpu "
msg_colon:      .asciz  ": "

        .section .bss
        .p2align 2
iterations:     .long   0
nb_cpus:        .long   0
ap_running:     .long   0
counters:       .skip   MAX_CPUS * 4
        .p2align 4
ap_stacks:      .skip   MAX_CPUS * AP_STACK_SIZE
