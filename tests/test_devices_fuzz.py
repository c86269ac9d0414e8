"""Hypothesis fuzzing of the port bus and the devices on it.

Random guests: sequences of INs and OUTs of 1, 2 and 4 bytes at any port,
mixed with host-side events (bytes arriving on the serial line, the character
timeout, a break).  Nothing may escape but the documented errors -- and a
well-formed access has none -- and these must hold after every step:

* the serial IRQ level last reported through the callback equals the level an
  independent reading of QEMU's priority rules gives from the UART's state,
  and IIR bit 0 agrees with it; successive reports alternate;
* the receive FIFO never holds more than 16 bytes, and nothing without FIFOs;
  can_receive() agrees with the free space;
* THRE and TEMT are always set (the output never blocks);
* every value read fits the access size;
* fw_cfg's read offset never passes the end of the selected item;
* debug-exit statuses are odd and fit in 8 bits.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkio.devices.debug_exit import IsaDebugExit
from qkio.devices.fw_cfg import FwCfg
from qkio.devices.ioport import PortBus
from qkio.devices.serial import Serial

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

SIZES = st.sampled_from([1, 2, 4])

# Ports near the devices are far more interesting than the other 65k, but any
# port is fair game.
PORTS = st.one_of(
    st.integers(0x3F6, 0x401),   # COM1 and both edges
    st.integers(0x50E, 0x515),   # fw_cfg and both edges
    st.integers(0xF2, 0xF9),     # isa-debug-exit and both edges
    st.integers(0, 0xFFFF),
)

# Values biased towards the bits that matter: DLAB, loopback, FIFO enable,
# IER bits, fw_cfg keys.
VALUES = st.one_of(
    st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x07, 0x0F, 0x10, 0x1F, 0x80, 0x81,
                     0xC1, 0xC7, 0xFF, 0x0019]),
    st.integers(0, 0xFFFFFFFF),
)

OPS = st.one_of(
    st.tuples(st.just("in"), PORTS, SIZES),
    st.tuples(st.just("out"), PORTS, SIZES, VALUES),
    st.tuples(st.just("receive"), st.binary(max_size=24)),
    st.tuples(st.just("timeout")),
    st.tuples(st.just("break")),
)


def expected_serial_iid(s: Serial) -> int:
    """QEMU's serial_update_irq priority, written out again independently."""
    fifo_on = s.fcr & 0x01
    causes = [
        (s.ier & 0x04 and s.lsr & 0x1E, 0x06),
        (s.ier & 0x01 and s.timeout_ipending, 0x0C),
        (s.ier & 0x01 and s.lsr & 0x01
         and (not fifo_on or len(s.recv_fifo) >= s.recv_fifo_itl), 0x04),
        (s.ier & 0x02 and s.thr_ipending, 0x02),
        (s.ier & 0x08 and s.msr & 0x0F, 0x00),
    ]
    for active, iid in causes:
        if active:
            return iid
    return 0x01


class Machine:
    def __init__(self):
        self.out = bytearray()
        self.edges = []
        self.statuses = []
        self.serial = Serial(self.out.extend, self.edges.append)
        self.fw_cfg = FwCfg(256 << 20, 2, 4)
        self.debug_exit = IsaDebugExit(self.statuses.append)
        self.bus = PortBus(on_unassigned=lambda *a: None)
        self.bus.register(0x3F8, 8, self.serial, "com1")
        self.bus.register(0x510, 2, self.fw_cfg, "fw_cfg")
        self.bus.register(0xF4, 4, self.debug_exit, "isa-debug-exit")

    def step(self, op):
        kind = op[0]
        if kind == "in":
            _, port, size = op
            value = self.bus.read(port, size)
            assert 0 <= value < 1 << (8 * size), (op, value)
        elif kind == "out":
            _, port, size, value = op
            self.bus.write(port, size, value)
        elif kind == "receive":
            self.serial.receive(op[1])
        elif kind == "timeout":
            self.serial.fifo_timeout()
        else:
            self.serial.receive_break()

    def check(self):
        s = self.serial
        iid = expected_serial_iid(s)
        level = 0 if iid == 0x01 else 1
        assert s.iir & 0x0F == iid
        assert s.irq_level == level
        assert (self.edges[-1] if self.edges else 0) == level
        assert all(a != b for a, b in zip(self.edges, self.edges[1:]))
        assert not self.edges or self.edges[0] == 1
        assert len(s.recv_fifo) <= 16
        if s.fcr & 0x01:
            assert s.can_receive() == 16 - len(s.recv_fifo)
            assert bool(s.lsr & 0x01) == bool(s.recv_fifo)
        else:
            assert not s.recv_fifo
            assert s.can_receive() == (0 if s.lsr & 0x01 else 1)
        assert s.lsr & 0x60 == 0x60
        for reg in (s.ier, s.iir, s.lcr, s.mcr, s.lsr, s.msr, s.scr, s.fcr, s.rbr):
            assert 0 <= reg <= 0xFF
        assert 0 <= s.divider <= 0xFFFF
        fw = self.fw_cfg
        assert 0 <= fw.cur_offset <= len(fw._cur_data)
        assert all(st & 1 and 0 < st < 256 for st in self.statuses)


@FUZZ
@given(st.lists(OPS, max_size=60))
def test_random_guests_keep_the_invariants(ops):
    m = Machine()
    m.check()
    for op in ops:
        m.step(op)
        m.check()


# Serial-only ops at the UART's own registers, so that long register-level
# sequences (DLAB on/off, FIFO on/off, loopback) happen often.
SERIAL_OPS = st.one_of(
    st.tuples(st.just("in"), st.integers(0x3F8, 0x3FF), st.just(1)),
    st.tuples(st.just("out"), st.integers(0x3F8, 0x3FF), st.just(1),
              st.integers(0, 0xFF)),
    st.tuples(st.just("receive"), st.binary(max_size=20)),
    st.tuples(st.just("timeout")),
)


@FUZZ
@given(st.lists(SERIAL_OPS, max_size=120))
def test_random_uart_register_traffic(ops):
    m = Machine()
    for op in ops:
        m.step(op)
        m.check()


@FUZZ
@given(st.lists(SERIAL_OPS, max_size=60), st.binary(min_size=1, max_size=40))
def test_no_byte_is_lost_while_the_host_respects_can_receive(prefix, data):
    # Whatever state random traffic left the UART in, leave loopback and DLAB,
    # then feed `data` only as fast as can_receive() allows and drain it the
    # way a driver does: nothing is lost or reordered.
    m = Machine()
    for op in prefix:
        m.step(op)
    m.bus.write(0x3FC, 1, 0x0B)      # MCR: no loopback
    m.bus.write(0x3FB, 1, 0x03)      # LCR: DLAB off
    while m.bus.read(0x3FD, 1) & 0x01:
        m.bus.read(0x3F8, 1)         # drain leftovers
    got = bytearray()
    pending = bytes(data)
    while pending:
        n = m.serial.can_receive()
        assert n > 0
        m.serial.receive(pending[:n])
        pending = pending[n:]
        assert not m.bus.read(0x3FD, 1) & 0x02   # no overrun
        while m.bus.read(0x3FD, 1) & 0x01:
            got.append(m.bus.read(0x3F8, 1))
        m.check()
    assert bytes(got) == data


class ByteRam:
    """A device that stores bytes: the simplest thing to check splitting with."""

    def __init__(self, length):
        self.mem = bytearray(length)

    def io_read(self, offset, size):
        assert offset % size == 0 and offset + size <= len(self.mem)
        return int.from_bytes(self.mem[offset:offset + size], "little")

    def io_write(self, offset, size, value):
        assert offset % size == 0 and offset + size <= len(self.mem)
        assert 0 <= value < 1 << (8 * size)
        self.mem[offset:offset + size] = value.to_bytes(size, "little")


@st.composite
def layouts(draw):
    """Up to 4 non-overlapping byte-RAM devices in a small window of ports."""
    starts = sorted(draw(st.sets(st.integers(0, 60), max_size=4)))
    regions = []
    for i, start in enumerate(starts):
        limit = (starts[i + 1] if i + 1 < len(starts) else 64) - start
        regions.append((0x1000 + start, draw(st.integers(1, min(limit, 9)))))
    return regions


@FUZZ
@given(layouts(), st.lists(st.tuples(st.booleans(), st.integers(0x0FFE, 0x1042), SIZES,
                                     st.integers(0, 0xFFFFFFFF)), max_size=40))
def test_bus_splitting_matches_a_byte_model(regions, accesses):
    # However an access is cut into pieces, the guest must see what a byte-wide
    # model predicts: owned bytes are memory, unowned bytes read 0xff and
    # swallow writes.
    bus = PortBus(on_unassigned=lambda *a: None)
    model = {}
    for base, length in regions:
        bus.register(base, length, ByteRam(length), f"ram{base:#x}")
        for p in range(base, base + length):
            model[p] = 0
    for is_write, port, size, value in accesses:
        if is_write:
            bus.write(port, size, value)
            for i in range(size):
                if port + i in model:
                    model[port + i] = (value >> (8 * i)) & 0xFF
        else:
            expect = sum(model.get(port + i, 0xFF) << (8 * i) for i in range(size))
            assert bus.read(port, size) == expect
