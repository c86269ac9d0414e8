"""The 16550A model, checked against what QEMU 7.2's hw/char/serial.c does."""

import pytest

from qkio.devices.ioport import PortBus
from qkio.devices.serial import (
    UART_FIFO_LENGTH,
    UART_IIR_CTI,
    UART_IIR_MSI,
    UART_IIR_NO_INT,
    UART_IIR_RDI,
    UART_IIR_RLSI,
    UART_IIR_THRI,
    Serial,
)

COM1 = 0x3F8
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7

DR, OE, BI, THRE, TEMT = 0x01, 0x02, 0x10, 0x20, 0x40


class Uart:
    """A Serial on a PortBus at COM1, with its output and IRQ edges recorded."""

    def __init__(self):
        self.out = bytearray()
        self.edges = []
        self.accepts = 0
        self.dev = Serial(self.out.extend, self.edges.append, self._accept)
        self.bus = PortBus(on_unassigned=lambda *a: None)
        self.bus.register(COM1, 8, self.dev, "com1")

    def _accept(self):
        self.accepts += 1

    def r(self, reg):
        return self.bus.read(COM1 + reg, 1)

    def w(self, reg, value):
        self.bus.write(COM1 + reg, 1, value)

    @property
    def level(self):
        return self.dev.irq_level


@pytest.fixture
def u():
    return Uart()


# -- reset state and plain registers ---------------------------------------------


def test_reset_values(u):
    assert u.r(IER) == 0
    assert u.r(IIR) == UART_IIR_NO_INT
    assert u.r(LCR) == 0
    assert u.r(MCR) == 0x08          # OUT2
    assert u.r(LSR) == THRE | TEMT
    assert u.r(MSR) == 0xB0          # DCD | DSR | CTS
    assert u.r(SCR) == 0
    assert u.level == 0 and u.edges == []


def test_scratch_register_stores_a_byte(u):
    u.w(SCR, 0x5A)
    assert u.r(SCR) == 0x5A


def test_lsr_and_msr_ignore_writes(u):
    u.w(LSR, 0)
    u.w(MSR, 0)
    assert u.r(LSR) == THRE | TEMT
    assert u.r(MSR) == 0xB0


def test_divisor_latch(u):
    assert u.dev.divider == 0x0C
    u.w(LCR, 0x80 | 0x03)            # DLAB + 8N1
    u.w(DLL, 0x01)
    u.w(DLM, 0x02)
    assert (u.r(DLL), u.r(DLM)) == (0x01, 0x02)
    assert u.dev.divider == 0x0201
    assert u.out == b""              # DLL is not THR
    assert u.dev.ier == 0            # DLM is not IER
    u.w(LCR, 0x03)
    assert u.r(IER) == 0
    u.w(THR, ord("x"))
    assert u.out == b"x"


# -- transmitting --------------------------------------------------------------------


def test_polling_driver_prints(u):
    # What earlyprintk does: LSR until THRE, then THR.  One LSR read per byte
    # suffices because THRE is set again before the OUT returns.
    lsr_reads = 0
    for ch in b"Hello, qkio!\n":
        while True:
            lsr_reads += 1
            if u.r(LSR) & THRE:
                break
        u.w(THR, ch)
    assert bytes(u.out) == b"Hello, qkio!\n"
    assert lsr_reads == len(b"Hello, qkio!\n")
    assert u.r(LSR) & (THRE | TEMT) == THRE | TEMT
    assert u.edges == []             # IER is 0: no interrupts


def test_output_is_called_once_per_byte_with_bytes():
    seen = []
    s = Serial(seen.append)
    s.io_write(THR, 1, 0x41)
    s.io_write(THR, 1, 0x42)
    assert seen == [b"A", b"B"]


def test_wide_access_touches_consecutive_registers(u):
    # A 2-byte OUT at THR writes THR then IER, as QEMU's memory core splits it.
    u.bus.write(COM1 + THR, 2, 0x0241)
    assert u.out == b"A"
    assert u.dev.ier == 0x02
    assert u.bus.read(COM1 + LCR, 2) == (u.r(MCR) << 8) | u.r(LCR)


# -- THRE interrupt --------------------------------------------------------------------


def test_enabling_thri_with_thr_empty_raises_thre(u):
    u.w(IER, 0x02)
    assert u.level == 1
    assert u.r(IIR) & 0x0F == UART_IIR_THRI
    # That read acknowledged it.
    assert u.level == 0
    assert u.r(IIR) & 0x0F == UART_IIR_NO_INT
    assert u.edges == [1, 0]


def test_thr_write_gives_a_fresh_edge(u):
    u.w(IER, 0x02)
    u.r(IIR)                         # acknowledge
    u.edges.clear()
    u.w(THR, ord("a"))
    assert u.edges == [1]            # was low: THRE pending again
    u.w(THR, ord("b"))
    assert u.edges == [1, 0, 1]      # was high: lowered by the write, raised by the send
    assert u.r(IIR) & 0x0F == UART_IIR_THRI


def test_rewriting_ier_with_thri_set_does_not_rearm(u):
    u.w(IER, 0x02)
    u.r(IIR)
    u.w(IER, 0x02)                   # no change in THRI: QEMU leaves it alone
    assert u.level == 0
    u.w(IER, 0x00)
    u.w(IER, 0x02)                   # off and on again: pending again
    assert u.level == 1


def test_thre_is_masked_not_forgotten_by_other_ier_bits(u):
    u.w(IER, 0x02)
    u.w(IER, 0x03)                   # add RDI; THRI unchanged
    assert u.r(IIR) & 0x0F == UART_IIR_THRI


def test_disabling_thri_clears_the_pending_thre(u):
    u.w(IER, 0x02)
    u.w(IER, 0x00)
    assert u.level == 0
    assert u.dev.thr_ipending is False


def test_iir_read_only_acknowledges_thre(u):
    u.w(IER, 0x03)
    u.dev.receive(b"x")
    assert u.r(IIR) & 0x0F == UART_IIR_RDI
    assert u.dev.thr_ipending        # hidden behind RDI, still pending
    u.r(RBR)
    assert u.r(IIR) & 0x0F == UART_IIR_THRI


# -- receiving ---------------------------------------------------------------------------


def test_receive_without_fifo_holds_one_byte(u):
    assert u.dev.can_receive() == 1
    u.dev.receive(b"a")
    assert u.dev.can_receive() == 0
    assert u.r(LSR) & DR
    assert u.r(RBR) == ord("a")
    assert not u.r(LSR) & DR
    assert u.accepts == 1
    assert u.dev.can_receive() == 1


def test_overrun_without_fifo_last_byte_wins(u):
    u.dev.receive(b"a")
    u.dev.receive(b"b")
    lsr = u.r(LSR)
    assert lsr & (DR | OE) == DR | OE
    assert not u.r(LSR) & OE         # reading LSR clears OE
    assert u.r(RBR) == ord("b")


def test_rx_data_interrupt_without_fifo(u):
    u.w(IER, 0x01)
    u.dev.receive(b"z")
    assert u.level == 1
    assert u.r(IIR) == UART_IIR_RDI
    u.r(RBR)
    assert u.level == 0


def test_fifo_enable_sets_iir_top_bits_and_fifo_fills(u):
    u.w(FCR, 0x01)
    assert u.r(IIR) == 0xC0 | UART_IIR_NO_INT
    assert u.dev.can_receive() == UART_FIFO_LENGTH
    u.dev.receive(b"0123456789")
    assert u.dev.can_receive() == 6
    u.dev.receive(b"abcdef")
    assert u.dev.can_receive() == 0
    assert not u.r(LSR) & OE
    got = bytearray()
    while u.r(LSR) & DR:
        got.append(u.r(RBR))
    assert got == b"0123456789abcdef"
    assert u.dev.can_receive() == UART_FIFO_LENGTH
    assert u.r(RBR) == 0             # empty FIFO reads 0


def test_fifo_overrun_keeps_old_bytes_and_sets_oe(u):
    u.w(FCR, 0x01)
    u.dev.receive(bytes(range(20)))
    assert len(u.dev.recv_fifo) == UART_FIFO_LENGTH
    assert u.r(LSR) & OE
    assert [u.r(RBR) for _ in range(16)] == list(range(16))


def test_fifo_trigger_level(u):
    u.w(IER, 0x01)
    u.w(FCR, 0x81)                   # FIFO on, trigger at 8
    u.dev.receive(b"1234567")
    assert u.level == 0              # below the trigger level
    assert u.dev.timeout_armed
    u.dev.receive(b"8")
    assert u.level == 1
    assert u.r(IIR) == 0xC0 | UART_IIR_RDI


def test_character_timeout(u):
    u.w(IER, 0x01)
    u.w(FCR, 0xC1)                   # trigger at 14
    u.dev.receive(b"k")
    assert u.level == 0
    u.dev.fifo_timeout()
    assert u.level == 1
    assert u.r(IIR) == 0xC0 | UART_IIR_CTI
    assert u.r(RBR) == ord("k")
    assert u.level == 0
    # A timeout with nothing in the FIFO does nothing.
    u.dev.fifo_timeout()
    assert u.level == 0


def test_fcr_receive_reset_empties_fifo(u):
    u.w(FCR, 0x01)
    u.dev.receive(b"abc")
    u.w(FCR, 0x03)
    assert not u.r(LSR) & DR
    assert u.dev.can_receive() == UART_FIFO_LENGTH
    assert u.dev.fcr == 0x01         # RFR does not stick


def test_toggling_fifo_enable_flushes(u):
    u.w(FCR, 0x01)
    u.dev.receive(b"abc")
    u.w(FCR, 0x00)
    assert not u.r(LSR) & DR
    assert u.r(IIR) == UART_IIR_NO_INT
    assert u.dev.can_receive() == 1


def test_receive_empty_is_a_no_op(u):
    u.dev.receive(b"")
    assert not u.r(LSR) & DR


# -- IIR priorities ------------------------------------------------------------------


def test_iir_priority_order(u):
    u.w(IER, 0x0F)
    u.w(FCR, 0x01)
    # THRE pending from enabling THRI; nothing higher yet.
    assert u.dev.pending_iir() == UART_IIR_THRI
    u.dev.msr |= 0x01                # a CTS delta: lowest priority
    assert u.dev.pending_iir() == UART_IIR_THRI
    u.dev.receive(b"x")
    assert u.dev.pending_iir() == UART_IIR_RDI
    u.dev.fifo_timeout()
    assert u.dev.pending_iir() == UART_IIR_CTI
    u.dev.receive(bytes(20))         # overrun -> line status
    assert u.r(IIR) & 0x0F == UART_IIR_RLSI
    # Service each in turn and watch the next one surface.
    u.r(LSR)
    assert u.r(IIR) & 0x0F == UART_IIR_CTI
    while u.r(LSR) & DR:
        u.r(RBR)
    assert u.r(IIR) & 0x0F == UART_IIR_THRI   # this read acknowledges THRE
    assert u.r(IIR) & 0x0F == UART_IIR_MSI
    assert u.r(MSR) == 0xB1
    assert u.r(IIR) & 0x0F == UART_IIR_NO_INT
    assert u.level == 0


def test_break_raises_line_status(u):
    u.w(IER, 0x04)
    u.dev.receive_break()
    assert u.r(IIR) & 0x0F == UART_IIR_RLSI
    assert u.r(LSR) & (BI | DR) == BI | DR
    assert u.level == 0              # reading LSR cleared BI
    assert u.r(RBR) == 0


def test_ier_masks_everything(u):
    u.dev.receive(b"x")
    u.dev.receive(b"y")              # overrun
    assert u.level == 0
    assert u.r(IIR) == UART_IIR_NO_INT


# -- loopback ------------------------------------------------------------------------------


def test_loopback_sends_thr_back_to_rbr(u):
    u.w(MCR, 0x10)
    u.w(THR, ord("L"))
    assert u.out == b""
    assert u.r(LSR) & DR
    assert u.r(RBR) == ord("L")
    assert u.accepts == 0            # the host's input was not drained


def test_loopback_with_fifo(u):
    u.w(MCR, 0x10)
    u.w(FCR, 0x01)
    for ch in b"loop":
        u.w(THR, ch)
    assert bytes(u.r(RBR) for _ in range(4)) == b"loop"


def test_loopback_modem_lines(u):
    # The 8250 driver's probe: loopback with OUT2|RTS -> DCD|CTS, etc.
    u.w(MCR, 0x10 | 0x0A)
    assert u.r(MSR) == 0x90
    u.w(MCR, 0x10 | 0x0F)
    assert u.r(MSR) == 0xF0
    u.w(MCR, 0x10)
    assert u.r(MSR) == 0x00
    u.w(MCR, 0x00)
    assert u.r(MSR) == 0xB0


def test_mcr_keeps_five_bits(u):
    u.w(MCR, 0xFF)
    assert u.r(MCR) == 0x1F


# -- the IRQ callback ------------------------------------------------------------------------


def test_irq_callback_only_on_change(u):
    u.w(IER, 0x01)
    u.dev.receive(b"a")
    u.dev.receive(b"b")
    assert u.edges == [1]
    u.r(RBR)
    assert u.edges == [1, 0]


def test_reset_lowers_the_line(u):
    u.w(IER, 0x02)
    assert u.level == 1
    u.dev.reset()
    assert u.edges == [1, 0]
    assert u.r(IER) == 0


def test_echo_guest_interrupt_driven(u):
    # An interrupt-driven echo: on IRQ, read IIR; RDI -> read RBR and send it.
    u.w(IER, 0x01)
    u.w(FCR, 0x01)                   # FIFO, trigger at 1
    u.dev.receive(b"ping")
    while u.level:
        iid = u.r(IIR) & 0x0F
        assert iid == UART_IIR_RDI
        while u.r(LSR) & DR:
            u.w(THR, u.r(RBR))
    assert u.out == b"ping"
    assert u.accepts == 4


def test_a_full_host_side_holds_the_byte_in_thr_with_thre_clear():
    """The host side refuses a byte (returns False): the transmitter is busy, as in
    QEMU's serial_xmit waiting on its G_IO_OUT watch; transmit_ready() sends it."""
    taken = bytearray()
    full = [False]

    def output(data):
        if full[0]:
            return False
        taken.extend(data)

    edges = []
    dev = Serial(output, edges.append)
    dev.io_write(IER, 1, 0x02)  # THRI: an edge each time THR empties
    dev.io_write(THR, 1, ord("a"))
    assert taken == b"a" and dev.io_read(LSR, 1) & (THRE | TEMT) == THRE | TEMT
    full[0] = True
    dev.io_write(THR, 1, ord("b"))
    assert taken == b"a" and dev.io_read(LSR, 1) & (THRE | TEMT) == 0
    assert dev.io_read(IIR, 1) & 0x0F == UART_IIR_NO_INT  # no THRE interrupt while busy
    dev.transmit_ready()  # still full: nothing changes
    assert dev.io_read(LSR, 1) & THRE == 0 and dev.tx_held == ord("b")
    full[0] = False
    dev.transmit_ready()
    assert taken == b"ab" and dev.io_read(LSR, 1) & (THRE | TEMT) == THRE | TEMT
    assert dev.io_read(IIR, 1) & 0x0F == UART_IIR_THRI


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_char_output_never_blocks_and_drains_through_the_loop(kind):
    """CharOutput on a one-page pipe (or a socket) nobody reads: write() refuses once
    its buffer is full instead of blocking; reading lets the io thread drain it."""
    import fcntl
    import os
    import socket

    from qkio.chardev import OUTPUT_LIMIT, CharOutput
    from qkio.main_loop import MainLoop

    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ
    else:
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        r, w = b.detach(), a.detach()
    rooms = []
    with MainLoop() as loop:
        out = CharOutput(loop, w, on_room=lambda: rooms.append(1))
        try:
            assert out.kind == ("reopened" if kind == "pipe" else "socket")
            assert os.get_blocking(w), "the caller's own file stays blocking"
            accepted = 0
            while out.write(b"x" * 100):
                accepted += 100
                loop.main_loop_wait(0)
                assert accepted < 1 << 20, "never refused"
            assert len(out.buffer) >= OUTPUT_LIMIT
            got = bytearray()
            while len(got) < accepted:
                got += os.read(r, 65536)
                loop.main_loop_wait(100)
            assert got == b"x" * accepted and rooms
        finally:
            out.close()
            os.close(r)
            os.close(w)
