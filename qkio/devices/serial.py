"""An 8250/16550A UART, modelled on QEMU 7.2's hw/char/serial.c.

The guest's console is a UART at 0x3f8 (COM1, IRQ 4).  Its eight registers,
at offsets 0-7 from the base::

    0  RBR (read) / THR (write)    receive buffer / transmit holding register
       DLL when LCR.DLAB = 1       divisor latch, low byte
    1  IER                         interrupt enable
       DLM when LCR.DLAB = 1       divisor latch, high byte
    2  IIR (read) / FCR (write)    interrupt identification / FIFO control
    3  LCR                         line control; bit 7 is DLAB
    4  MCR                         modem control; bit 4 is loopback
    5  LSR                         line status
    6  MSR                         modem status
    7  SCR                         scratch, a byte of storage and nothing else

How a guest prints: polling
---------------------------
Early consoles (Linux's earlyprintk, the 8250 console write path, every
hobby kernel) never take an interrupt.  For each byte they spin reading LSR
until THRE ("transmit holding register empty", bit 5) is set, then write the
byte to THR.  Under a VMM that keeps up, that is one LSR read per byte
written, because THRE is already set every time the driver looks (count
them: ``qkio run --kernel flood`` reports its exits on SIGHUP).  It always
is here, as in QEMU when the chardev backend keeps up: a THR
write goes straight to ``output``, so THRE and TEMT ("transmitter empty", bit
6) are set again before the OUT instruction even returns to the guest.  The
transmit FIFO therefore never holds a byte between two guest accesses, and is
not modelled; QEMU only keeps bytes in it while a host write would block.

Receiving is LSR again: DR (bit 0) says RBR holds a byte.  Reading RBR takes
it; DR clears when nothing is left.

How a guest takes interrupts: IIR
---------------------------------
An interrupt-driven driver enables causes in IER and, on IRQ 4, reads IIR to
learn which one fired.  The UART has one interrupt line but several causes, so
IIR reports only the most urgent pending, enabled cause, and its bit 0 is
*clear* when something is pending (an active-low "no interrupt" flag).  The
line is high exactly when IIR bit 0 is clear.  QEMU's order, highest first:

    IIR 0x06  receiver line status  LSR has OE/PE/FE/BI set       (IER bit 2)
    IIR 0x0c  character timeout     FIFO data sat unread 4 chars  (IER bit 0)
    IIR 0x04  received data         RBR full / FIFO >= trigger    (IER bit 0)
    IIR 0x02  THR empty             see below                     (IER bit 1)
    IIR 0x00  modem status          an MSR delta bit is set       (IER bit 3)
    IIR 0x01  nothing pending

Each cause is cleared by servicing it: reading LSR clears line status, reading
RBR drains data, reading MSR clears the deltas.  THRE is different, because
"the transmitter is empty" stays true forever on an idle UART: if it were a
plain level the line would never drop.  So THRE is a one-shot event,
``thr_ipending``: it is set when THR becomes empty after a write (every THR
write, here), and when the guest turns IER.THRI on while THR is already empty;
it is cleared by a THR write or by a read of IIR that *reports* THRE.  That
last rule is why a driver must read IIR in its handler: the read is the
acknowledgement.

The line is reported through ``irq(level)`` only when it changes.  A THR write
with IER.THRI set lowers it (the write clears thr_ipending) and raises it
again (the byte is sent at once), which gives the edge-triggered PIC the fresh
edge it needs for every byte, just as QEMU's qemu_irq_lower/raise pair does.

What is left out
----------------
Baud rate and timing: the divisor latch is stored and read back, but bytes move
at the speed of Python.  Break, parity and framing errors from the host never
happen (``receive_break`` exists for tests and completeness).  Modem lines:
MSR reads DCD|DSR|CTS as a null-modem cable would, as QEMU does with a chardev
that has no real lines.  The character timeout needs a clock; see
:meth:`Serial.fifo_timeout`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

# -- register bits (the names are Linux's and QEMU's) ---------------------------

UART_LCR_DLAB = 0x80  # divisor latch access

UART_IER_MSI = 0x08   # modem status interrupt
UART_IER_RLSI = 0x04  # receiver line status interrupt
UART_IER_THRI = 0x02  # THR empty interrupt
UART_IER_RDI = 0x01   # received data interrupt

UART_IIR_NO_INT = 0x01
UART_IIR_ID = 0x06    # the mask QEMU tests to see if IIR is reporting THRE
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_CTI = 0x0C   # character timeout
UART_IIR_FE = 0xC0    # "FIFOs enabled", set in IIR's top bits

UART_FCR_FE = 0x01    # FIFO enable
UART_FCR_RFR = 0x02   # receive FIFO reset
UART_FCR_XFR = 0x04   # transmit FIFO reset
UART_FCR_DMS = 0x08   # DMA mode select: stored, no effect

UART_MCR_LOOP = 0x10
UART_MCR_OUT2 = 0x08
UART_MCR_OUT1 = 0x04
UART_MCR_RTS = 0x02
UART_MCR_DTR = 0x01

UART_MSR_DCD = 0x80
UART_MSR_RI = 0x40
UART_MSR_DSR = 0x20
UART_MSR_CTS = 0x10
UART_MSR_ANY_DELTA = 0x0F

UART_LSR_TEMT = 0x40
UART_LSR_THRE = 0x20
UART_LSR_BI = 0x10
UART_LSR_FE = 0x08
UART_LSR_PE = 0x04
UART_LSR_OE = 0x02
UART_LSR_DR = 0x01
UART_LSR_INT_ANY = 0x1E  # the error bits that raise a line status interrupt

#: Depth of the 16550A receive FIFO.
UART_FIFO_LENGTH = 16

#: FCR bits 7:6 -> how many bytes the FIFO holds before "received data" fires.
_TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}

#: How many ports the UART decodes.
SERIAL_IO_SIZE = 8

# Every possible one-byte ``bytes``, made once so sending a byte allocates nothing.
_BYTE = tuple(bytes((i,)) for i in range(256))


class Serial:
    """A 16550A UART.  Register it on a :class:`~qkio.devices.ioport.PortBus`
    with length :data:`SERIAL_IO_SIZE`.

    ``output(data)`` receives every byte the guest transmits (one byte per
    call); it may return False to refuse the byte (the host side is full),
    which leaves it in THR with LSR.THRE clear until the owner calls
    :meth:`transmit_ready`.  Any other return value means "sent".
    ``irq(level)`` is called with 1 or 0 whenever the interrupt line changes.  ``accept_input()`` is called after the guest reads RBR outside
    loopback mode, i.e. when :meth:`can_receive` may have grown: QEMU's
    ``qemu_chr_fe_accept_input``, which wakes the io thread so it polls stdin
    again.  Exceptions raised by these callbacks propagate to the caller of
    ``io_read``/``io_write``/``receive``; the UART's state is consistent by
    then.
    """

    def __init__(self,
                 output: Callable[[bytes], object],
                 irq: Callable[[int], None] = lambda level: None,
                 accept_input: Callable[[], None] = lambda: None):
        self.output = output
        self.irq = irq
        self.accept_input = accept_input
        self.irq_level = 0
        self.reset()
        # Dispatch tables indexed by register offset: bound methods are built
        # once here, so an access allocates nothing.  PortBus calls them
        # directly for a byte access (its byte handlers), and so does the
        # native exit loop: one call per access instead of two.
        self.byte_readers = (self._read_rbr, self._read_ier, self._read_iir,
                         self._read_lcr, self._read_mcr, self._read_lsr,
                         self._read_msr, self._read_scr)
        self.byte_writers = (self._write_thr, self._write_ier, self._write_fcr,
                         self._write_lcr, self._write_mcr, self._write_ignored,
                         self._write_ignored, self._write_scr)

    def reset(self) -> None:
        """Power-on state, as QEMU's serial_reset."""
        self.rbr = 0
        self.ier = 0
        self.iir = UART_IIR_NO_INT
        self.lcr = 0
        self.lsr = UART_LSR_TEMT | UART_LSR_THRE
        self.msr = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
        self.divider = 0x0C  # 115200 / 12 = 9600 baud
        self.mcr = UART_MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.recv_fifo: deque[int] = deque()
        self.recv_fifo_itl = 1
        self.tx_held: int | None = None  # a byte the host side refused, still in THR
        self.tx_overwritten = 0
        self.thr_ipending = False
        self.timeout_ipending = False
        self.timeout_armed = False
        self._set_irq(0)

    # -- the port interface ----------------------------------------------------

    def io_read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes starting at register ``offset``.

        The UART's registers are one byte wide.  A wider access reads
        consecutive registers, lowest first, little-endian -- what QEMU's
        memory core does for a device whose implementation takes only byte
        accesses.
        """
        if size == 1:
            return self.byte_readers[offset & 7]()
        value = 0
        for i in range(size):
            value |= self.byte_readers[(offset + i) & 7]() << (8 * i)
        return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes of ``value`` starting at register ``offset``."""
        if size == 1:
            self.byte_writers[offset & 7](value & 0xFF)
            return
        for i in range(size):
            self.byte_writers[(offset + i) & 7]((value >> (8 * i)) & 0xFF)

    # -- the host side -----------------------------------------------------------

    def can_receive(self) -> int:
        """How many bytes :meth:`receive` can take without an overrun.

        This is the chardev front end's ``fd_read_poll``: the io thread only
        reads stdin when it is non-zero, which is how a slow guest pushes back
        on a fast host.  With FIFOs enabled it is the free space in the FIFO.
        (QEMU advertises less -- at most up to the trigger level -- so that a
        burst does not fill the FIFO past the level the guest asked to be
        interrupted at; qkio prefers fewer io thread wake-ups.)  Without FIFOs
        the UART holds one byte: 1 if RBR is empty, else 0.
        """
        if self.fcr & UART_FCR_FE:
            return UART_FIFO_LENGTH - len(self.recv_fifo)
        return 0 if self.lsr & UART_LSR_DR else 1

    def receive(self, data: bytes) -> None:
        """Bytes arriving on the line from the host.

        Never raises.  Bytes beyond :meth:`can_receive` are an overrun, handled
        as the UART (and QEMU) handles one: LSR.OE is set, which raises a line
        status interrupt if enabled.  With FIFOs enabled the surplus bytes are
        lost and the FIFO keeps what it had; without FIFOs each byte replaces
        the one in RBR, so the last byte wins.

        With FIFOs enabled QEMU starts a 4-character timer here; see
        :meth:`fifo_timeout`.
        """
        if not data:
            return
        if self.fcr & UART_FCR_FE:
            fifo = self.recv_fifo
            room = UART_FIFO_LENGTH - len(fifo)
            fifo.extend(data[:room])
            if len(data) > room:
                self.lsr |= UART_LSR_OE
            self.lsr |= UART_LSR_DR
            self.timeout_armed = True
        else:
            if self.lsr & UART_LSR_DR or len(data) > 1:
                self.lsr |= UART_LSR_OE
            self.rbr = data[-1]
            self.lsr |= UART_LSR_DR
        self._update_irq()

    def receive_break(self) -> None:
        """A break condition on the line: a NUL byte with LSR.BI set."""
        self.rbr = 0
        if self.fcr & UART_FCR_FE:
            if len(self.recv_fifo) < UART_FIFO_LENGTH:
                self.recv_fifo.append(0)
            else:
                self.lsr |= UART_LSR_OE
        self.lsr |= UART_LSR_BI | UART_LSR_DR
        self._update_irq()

    def fifo_timeout(self) -> None:
        """The character-timeout timer fired (QEMU's fifo_timeout_int).

        A FIFO holding fewer bytes than the trigger level raises no "received
        data" interrupt; a real 16550A raises "character timeout" instead once
        the line has been idle for 4 character times, so a lone keystroke is
        not stuck.  QEMU arms a timer for that on every receive and on every
        RBR read that leaves data behind.  qkio has no virtual clock, so the
        timer belongs to the owner: :attr:`timeout_armed` says a timer would be
        running, and the io thread should call this when the line has gone
        quiet (simplest: after delivering what stdin had).
        """
        self.timeout_armed = False
        if self.recv_fifo:
            self.timeout_ipending = True
            self._update_irq()

    # -- the interrupt line -------------------------------------------------------

    def pending_iir(self) -> int:
        """The interrupt ID the current state calls for (IIR bits 3:0)."""
        ier, lsr = self.ier, self.lsr
        if ier & UART_IER_RLSI and lsr & UART_LSR_INT_ANY:
            return UART_IIR_RLSI
        if ier & UART_IER_RDI:
            # QEMU lets IER.RDI mask the timeout interrupt too; the datasheet
            # does not say so, but real parts behave that way.
            if self.timeout_ipending:
                return UART_IIR_CTI
            if lsr & UART_LSR_DR and (not self.fcr & UART_FCR_FE
                                      or len(self.recv_fifo) >= self.recv_fifo_itl):
                return UART_IIR_RDI
        if ier & UART_IER_THRI and self.thr_ipending:
            return UART_IIR_THRI
        if ier & UART_IER_MSI and self.msr & UART_MSR_ANY_DELTA:
            return UART_IIR_MSI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        iid = self.pending_iir()
        self.iir = iid | (self.iir & 0xF0)
        self._set_irq(0 if iid == UART_IIR_NO_INT else 1)

    def _set_irq(self, level: int) -> None:
        if level != self.irq_level:
            self.irq_level = level
            self.irq(level)

    # -- register reads --------------------------------------------------------------

    def _read_rbr(self) -> int:
        if self.lcr & UART_LCR_DLAB:
            return self.divider & 0xFF
        if self.fcr & UART_FCR_FE:
            fifo = self.recv_fifo
            value = fifo.popleft() if fifo else 0
            if fifo:
                self.timeout_armed = True
            else:
                self.lsr &= ~(UART_LSR_DR | UART_LSR_BI)
            self.timeout_ipending = False
        else:
            value = self.rbr
            self.lsr &= ~(UART_LSR_DR | UART_LSR_BI)
        self._update_irq()
        if not self.mcr & UART_MCR_LOOP:
            # Looped-back bytes come from THR, not the host; only tell the host
            # side there is room when it is the host's data being drained.
            self.accept_input()
        return value

    def _read_ier(self) -> int:
        if self.lcr & UART_LCR_DLAB:
            return self.divider >> 8
        return self.ier

    def _read_iir(self) -> int:
        value = self.iir
        # Reading IIR while it reports THRE is the acknowledgement of THRE.
        if value & UART_IIR_ID == UART_IIR_THRI:
            self.thr_ipending = False
            self._update_irq()
        return value

    def _read_lcr(self) -> int:
        return self.lcr

    def _read_mcr(self) -> int:
        return self.mcr

    def _read_lsr(self) -> int:
        value = self.lsr
        # Break and overrun are events: reading LSR reports and clears them.
        if value & (UART_LSR_BI | UART_LSR_OE):
            self.lsr &= ~(UART_LSR_BI | UART_LSR_OE)
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        mcr = self.mcr
        if mcr & UART_MCR_LOOP:
            # In loopback the modem outputs are wired to the inputs:
            # OUT2->DCD, OUT1->RI, RTS->CTS, DTR->DSR.  No delta bits.
            return ((mcr & 0x0C) << 4) | ((mcr & UART_MCR_RTS) << 3) | ((mcr & UART_MCR_DTR) << 5)
        value = self.msr
        if value & UART_MSR_ANY_DELTA:
            self.msr &= 0xF0
            self._update_irq()
        return value

    def _read_scr(self) -> int:
        return self.scr

    # -- register writes ----------------------------------------------------------------

    def _write_thr(self, value: int) -> None:
        if self.lcr & UART_LCR_DLAB:
            self.divider = (self.divider & 0xFF00) | value
            return
        # The write fills THR: THRE, TEMT and any pending THRE interrupt go ...
        self.thr_ipending = False
        self.lsr &= ~(UART_LSR_THRE | UART_LSR_TEMT)
        self._update_irq()
        if self.mcr & UART_MCR_LOOP:
            # Loopback: the transmitter's output is wired to the receiver.
            self._thr_empty()
            self.receive(_BYTE[value])
            return
        if self.output(_BYTE[value]) is False:
            # The host side is full: the byte stays in THR and the
            # transmitter is busy (THRE clear) until transmit_ready().  A
            # guest that writes THR anyway overwrites it, as on the chip.
            if self.tx_held is not None:
                self.tx_overwritten += 1
            self.tx_held = value
            return
        # ... and the byte has left, so THR is empty again and THRE becomes
        # pending (QEMU's serial_xmit).
        self._thr_empty()

    def _thr_empty(self) -> None:
        self.tx_held = None
        self.lsr |= UART_LSR_THRE | UART_LSR_TEMT
        self.thr_ipending = True
        self._update_irq()

    def transmit_ready(self) -> None:
        """The host side has room again: send the byte held in THR, if any.

        QEMU's ``serial_xmit`` run from its ``G_IO_OUT`` watch.  Called with
        the global lock held (by the io thread)."""
        held = self.tx_held
        if held is None:
            return
        if self.output(_BYTE[held]) is not False:
            self._thr_empty()

    def _write_ier(self, value: int) -> None:
        if self.lcr & UART_LCR_DLAB:
            self.divider = (self.divider & 0x00FF) | (value << 8)
            return
        changed = (self.ier ^ value) & 0x0F
        self.ier = value & 0x0F
        if changed & UART_IER_THRI:
            # Turning THRI on while THR is empty makes THRE pending even if an
            # IIR read had acknowledged it (QEMU does this because Windows
            # relies on it); turning it off forgets it.
            self.thr_ipending = bool(self.ier & UART_IER_THRI and self.lsr & UART_LSR_THRE)
        if changed:
            self._update_irq()

    def _write_fcr(self, value: int) -> None:
        # Switching FIFOs on or off flushes both of them.
        if (value ^ self.fcr) & UART_FCR_FE:
            value |= UART_FCR_XFR | UART_FCR_RFR
        if value & UART_FCR_RFR:
            self.lsr &= ~(UART_LSR_DR | UART_LSR_BI)
            self.timeout_ipending = False
            self.timeout_armed = False
            self.recv_fifo.clear()
        if value & UART_FCR_XFR:
            # The transmit FIFO is flushed (with a byte held for a full host
            # side, that byte is dropped, and the transmitter is idle): THR is empty.
            if self.tx_held is not None:
                self.tx_held = None
                self.lsr |= UART_LSR_TEMT
            self.lsr |= UART_LSR_THRE
            self.thr_ipending = True
        # The reset bits self-clear; enable, DMA mode and trigger level stick.
        self.fcr = value & 0xC9
        if self.fcr & UART_FCR_FE:
            self.iir |= UART_IIR_FE
            self.recv_fifo_itl = _TRIGGER_LEVELS[self.fcr & 0xC0]
        else:
            self.iir &= ~UART_IIR_FE
        self._update_irq()

    def _write_lcr(self, value: int) -> None:
        self.lcr = value

    def _write_mcr(self, value: int) -> None:
        self.mcr = value & 0x1F

    def _write_scr(self, value: int) -> None:
        self.scr = value

    def _write_ignored(self, value: int) -> None:
        # LSR and MSR are read-only; QEMU drops writes to them.
        pass
