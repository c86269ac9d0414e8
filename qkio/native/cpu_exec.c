/* cpu_exec.c -- the hot half of qkio's vCPU loop, without the interpreter.
 *
 * What this is.  qemu-kvm 0.12's kvm_cpu_exec() does, per guest exit:
 *
 *     pre_kvm_run()      unlock qemu_mutex
 *     ioctl(KVM_RUN)     the guest runs until it needs the VMM
 *     post_kvm_run()     lock qemu_mutex
 *     dispatch the exit  for KVM_EXIT_IO: find the device that owns the port,
 *                        call it, put an IN's result into the kvm_run page
 *
 * qkio does exactly that in Python (qkio/cpus.py, CpuThread._cpu_loop), and it
 * is correct there.  It is also slow there, for a reason worth knowing: on this
 * kind of host a guest exit costs ~8 us of kernel time, and on the way back
 * to the VMM the CPU's caches and TLB are cold.  A C loop touches a few cache
 * lines per exit; the interpreter touches hundreds (frames, code objects,
 * dicts, the ctypes machinery).  Measured when this was written (nested KVM,
 * 2026-11) with the `pio` guest, relative to the same loop written in C
 * (qkio/bench/pio_ref.c); `qkio bench pio` measures the whole of each path:
 *
 *     KVM_RUN through ctypes, nothing else                 ~1.15 x C
 *     KVM_RUN through a C function, nothing else           ~1.02 x C
 *     ... plus the qemu_mutex pair done in Python          ~1.08 x C
 *     ... plus decoding and dispatching the OUT in Python  ~1.14 x C
 *     this file, calling the Python device                 ~1.03-1.05 x C
 *
 * (those were whole-run timings, which this host's drifting speed blurs; the
 * guest's own clock, as `qkio bench pio` times exits since 2026-11-26, puts
 * this file at 1.11-1.13 x C on a device's byte register and 1.05-1.06 x C
 * on a port nobody owns: the GIL and qemu_mutex pair is ~0.35 us, the call
 * into the device's Python handler ~0.4 us more).  Where the rest goes, by
 * perf (cpu-clock, 400,000 OUTs to 0x3ff, each pinned to one CPU): the
 * kernel's part of an exit is the same in qkio's vCPU thread as in pio_ref
 * -- about 2.8 us in write_ibpb (kvm_pvm's branch-predictor barrier on
 * every exit) and 2 us reading an MSR in vcpu_load, per KVM_RUN -- and the
 * difference is all user space: 13 % of qkio's samples (libpython 7.7 %,
 * libc 4.5 %: the GIL's mutex and condition variable, the handler's frame)
 * against 2.3 % of pio_ref's.
 *
 * so this file does those four steps for the one exit that comes by the
 * hundred thousand -- port I/O to a device on qkio's PortBus -- and hands
 * every other exit back to the Python loop.  The device models stay Python:
 * this calls them exactly as PortBus.read/write's fast paths would -- a
 * byte access through the device's handler for that register when it has
 * them (the table's byte_readers/byte_writers: the UART does), any other
 * through io_read/io_write.  `qkio bench pio` measures both paths side by
 * side.
 *
 * The interface is one function:
 *
 *     run(fd, run_page, mutex, table, io_exits[, reported[, mmio_pages]]) -> ret
 *
 *   fd        the vCPU fd
 *   run_page  the mmap'ed struct kvm_run (anything with a writable buffer)
 *   mutex     qkio.bql.GlobalMutex, held by the calling thread; used only
 *             through its documented contract with this file (raw_lock,
 *             owner, lock_contended(): see GlobalMutex's docstring)
 *   table     PortBus.table: a list of at least 65536 entries, each None or
 *             a (device, base, length, byte_readers, byte_writers) tuple
 *             (see PortBus.table's docstring)
 *   io_exits  a writable buffer holding one native-endian uint64 (an
 *             array('Q', [0]), say): the number of port accesses completed
 *             here, bumped after each one so that other threads read a live
 *             count (the exit tally, the SIGHUP report) while we loop; with
 *             mmio_pages, two: then the second counts MMIO accesses
 *   reported  optional: PortBus.reported, a byte per port, 1 once that unowned
 *             port has been reported
 *   mmio_pages optional: MmioBus.unowned_pages, uint64s: a count n, then n
 *             pages (address >> 12) already reported that no device touches;
 *             with it, io_exits holds a second uint64, the MMIO accesses
 *             completed here
 *
 * It loops until an exit it does not handle and returns that exit's reason
 * (>= 0) or, when KVM_RUN failed, -errno (EINTR is a kick, EAGAIN an AP woken
 * by INIT -- qkio.kvm.exits.reason_for_errno maps it, as for Vcpu.run).  io_exits is how many port accesses it
 * completed itself, for the exit tally.  It always returns with the mutex held
 * by the caller, as it was on entry; if a device raises, the exception
 * propagates, also with the mutex held.
 *
 * Exits it hands back untouched (the Python path then does the full work):
 * anything but KVM_EXIT_IO and KVM_EXIT_MMIO; every KVM_EXIT_MMIO but one
 * to memory nobody owns on a page MmioBus has reported (with the seventh
 * argument, MmioBus.unowned_pages: that one is completed here, a write
 * dropped, a read answered 0 -- QEMU 7.2's unassigned_mem_read -- so that it
 * costs what an unowned port costs); string I/O (count > 1); a port nobody owns that
 * the bus has not reported yet (it logs each unowned port once; after that,
 * with the optional sixth argument `reported`, PortBus.reported, the access
 * is completed here: dropped, or read as all ones); an access that runs off
 * its device or is unaligned (the bus splits it, as QEMU's memory core would).
 *
 * Kicks need nothing here.  A kick sets immediate_exit or leaves SIG_IPI
 * pending *before* it signals, so the next KVM_RUN returns EINTR and we hand
 * -EINTR back: every request is still seen by the Python loop, by the same
 * argument as in qkio/cpus.py.
 *
 * The mutex.  GlobalMutex's uncontended lock and unlock are a store to
 * owner and raw_lock's acquire/release; this repeats those two fast paths
 * and, when the non-blocking acquire fails, calls the mutex's own
 * lock_contended(), which blocks with the GIL released and records the wait
 * in the trace.  So a thread waiting for qemu_mutex looks the same whichever
 * path took it.  Order matters: we never *wait* for the mutex while holding
 * the GIL, or a thread holding the mutex and wanting the GIL would deadlock
 * against us.
 *
 * raw_lock is QemuMutex, below, when GlobalMutex was made with this
 * module loaded (it then is the lock under every qemu_mutex), and then we
 * lock and unlock it with two direct calls.  Going through a
 * threading.Lock's methods instead cost ~0.3 us per exit here: acquire()
 * parses its arguments as keywords-or-tuple on every call.  Any other lock
 * object still works, through its methods.  owner, a __slots__ member of
 * GlobalMutex, is stored straight into its slot (the member descriptor says
 * where), not through PyObject_SetAttr.
 *
 * What those last two cost, measured (2026-11-26, `pio-loop chunk=1000` to
 * the UART's scratch register, the guest's own clock, 8 interleaved rounds
 * in one process pinned to one CPU, the fastest chunk of each run): owner
 * through PyObject_SetAttr and the byte going through Serial.io_write cost
 * 1.0 us more per exit at the median than this (every round more; 0.3 to
 * 3.6 us), of which the slot store alone 0.3 and the byte handler 0.5.  After
 * an exit the interpreter runs cold: every frame and lookup saved shows.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>  /* T_OBJECT_EX, READONLY: the owner slot's member */

#include <errno.h>
#include <limits.h>
#include <linux/kvm.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

#define PORT_COUNT 0x10000

/* --- QemuMutex: a plain, non-recursive lock with C-callable fast paths ------- */

/* A POSIX semaphore of one token, used directly.  CPython's own lock is the
 * same semaphore, but its non-blocking acquire also reads the clock and
 * builds a deadline it never waits for (CPython 3.11, Python/thread_pthread.h,
 * PyThread_acquire_lock_timed: where HAVE_SEM_CLOCKWAIT, the deadline is
 * computed before the timeout is looked at, even for a zero timeout) -- on
 * the exit path, twice per exit.  sem_trywait and
 * sem_post are one atomic operation each when nobody waits.  A blocking
 * acquire waits in sem_wait, which a signal interrupts (EINTR), so Python's
 * signal handlers still run while a thread waits for the lock, as with
 * threading.Lock. */
typedef struct {
    PyObject_HEAD
    sem_t sem;
    char ready;   /* sem was initialised */
    char locked;
} QemuMutex;

static PyTypeObject QemuMutex_Type;

static PyObject *qemu_mutex_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    QemuMutex *self;

    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "QemuMutex() takes no arguments");
        return NULL;
    }
    if (!(self = (QemuMutex *)type->tp_alloc(type, 0)))
        return NULL;
    if (sem_init(&self->sem, 0, 1) < 0) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->ready = 1;
    return (PyObject *)self;
}

static void qemu_mutex_dealloc(QemuMutex *self)
{
    if (self->ready)
        sem_destroy(&self->sem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int qemu_mutex_trylock(QemuMutex *self)
{
    if (sem_trywait(&self->sem) < 0)
        return 0;
    self->locked = 1;
    return 1;
}

static void qemu_mutex_unlock(QemuMutex *self)
{
    self->locked = 0;
    sem_post(&self->sem);
}

/* acquire(blocking=True) -> bool.  Waits with the GIL released, and, like
 * threading.Lock, lets signal handlers run (and raise) while it waits. */
static PyObject *qemu_mutex_acquire(QemuMutex *self, PyObject *const *args, Py_ssize_t nargs)
{
    int blocking = 1, r, err;

    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "acquire(blocking=True) takes at most 1 argument");
        return NULL;
    }
    if (nargs == 1 && (blocking = PyObject_IsTrue(args[0])) < 0)
        return NULL;
    if (qemu_mutex_trylock(self))
        Py_RETURN_TRUE;
    if (!blocking)
        Py_RETURN_FALSE;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        r = sem_wait(&self->sem);
        err = errno;
        Py_END_ALLOW_THREADS
        if (r == 0)
            break;
        if (err != EINTR) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (Py_MakePendingCalls() < 0)
            return NULL;
    }
    self->locked = 1;
    Py_RETURN_TRUE;
}

static PyObject *qemu_mutex_release(QemuMutex *self, PyObject *unused)
{
    if (!self->locked) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    qemu_mutex_unlock(self);
    Py_RETURN_NONE;
}

static PyObject *qemu_mutex_locked(QemuMutex *self, PyObject *unused)
{
    return PyBool_FromLong(self->locked);
}

static PyMethodDef qemu_mutex_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))qemu_mutex_acquire, METH_FASTCALL,
     "acquire(blocking=True) -> bool"},
    {"release", (PyCFunction)qemu_mutex_release, METH_NOARGS, "release()"},
    {"locked", (PyCFunction)qemu_mutex_locked, METH_NOARGS, "locked() -> bool"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject QemuMutex_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "qkio.native._cpu_exec.QemuMutex",
    .tp_doc = "A non-recursive lock, like threading.Lock, that the exit loop can take without a call.",
    .tp_basicsize = sizeof(QemuMutex),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = qemu_mutex_new,
    .tp_dealloc = (destructor)qemu_mutex_dealloc,
    .tp_methods = qemu_mutex_methods,
};

/* --- the exit loop -------------------------------------------------------------- */

static PyObject *s_owner, *s_raw_lock, *s_release, *s_acquire, *s_contended, *s_io_read, *s_io_write;

/* Everything one call needs, looked up once per call (not per exit). */
struct loop {
    int fd;
    struct kvm_run *run;
    Py_ssize_t run_size;
    PyObject *mutex, *release, *acquire, *contended, *ident, *slots;
    QemuMutex *raw;  /* the mutex's raw_lock, if it is a QemuMutex; else NULL */
    Py_ssize_t owner_offset;  /* where the mutex keeps owner, if a plain slot; else -1 */
    const uint8_t *reported;  /* PortBus.reported, a flag per port; NULL if not given */
    const uint64_t *mmio_pages;  /* MmioBus.unowned_pages; NULL if not given */
    Py_ssize_t mmio_slots;       /* how many pages it has room for */
};


/* mutex.owner = value.  A slot store when owner is a plain __slots__ member
 * (GlobalMutex's is): PyObject_SetAttr would intern the name, look it up in
 * the type and reach the same store through the member descriptor -- twice
 * per exit, and measurable (see GlobalMutex). */
static int set_owner(struct loop *l, PyObject *value)
{
    if (l->owner_offset >= 0) {
        PyObject **slot = (PyObject **)((char *)l->mutex + l->owner_offset);
        PyObject *old = *slot;
        *slot = Py_NewRef(value);
        Py_XDECREF(old);  /* None or a thread's ident: no code runs */
        return 0;
    }
    return PyObject_SetAttr(l->mutex, s_owner, value);
}

/* pre_kvm_run; KVM_RUN with the GIL released; post_kvm_run.
 * Returns KVM_RUN's result (-errno on failure) in *ret; -1 if Python raised. */
static int run_once(struct loop *l, int *ret)
{
    PyObject *r;
    int rc, err = 0, got;

    if (set_owner(l, Py_None) < 0)
        return -1;
    if (l->raw) {
        qemu_mutex_unlock(l->raw);
    } else {
        if (!(r = PyObject_CallNoArgs(l->release)))
            return -1;
        Py_DECREF(r);
    }

    Py_BEGIN_ALLOW_THREADS
    rc = ioctl(l->fd, KVM_RUN, 0);
    if (rc < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    rc = rc < 0 ? -err : rc;

    if (l->raw) {
        got = qemu_mutex_trylock(l->raw);
    } else {
        if (!(r = PyObject_CallOneArg(l->acquire, Py_False)))
            return -1;
        got = r == Py_True;
        Py_DECREF(r);
    }
    if (!got) {
        if (!(r = PyObject_CallNoArgs(l->contended)))
            return -1;
        Py_DECREF(r);
    }
    if (set_owner(l, l->ident) < 0)
        return -1;
    *ret = rc;
    return 0;
}

/* Little-endian, like the guest and like PortBus. */
static uint32_t load_le(const uint8_t *p, int size)
{
    uint32_t v = 0;
    for (int i = size - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void store_le(uint8_t *p, int size, uint32_t v)
{
    for (int i = 0; i < size; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

/* An access to ports nobody owns, every one of them already reported by
 * PortBus (which logs each unowned port once): complete it here, as PortBus
 * would -- an OUT is dropped, an IN reads all ones -- so that it costs no more
 * than an access to a device (QEMU's unassigned region answers in C too).
 * 1: done; 0: the Python path must take it (owned, or not reported yet). */
static int complete_unowned(struct loop *l, int port, int size, uint8_t *data)
{
    if (!l->reported || port + size > PyList_GET_SIZE(l->slots))
        return 0;
    for (int p = port; p < port + size; p++)
        if (PyList_GET_ITEM(l->slots, p) != Py_None || !l->reported[p])
            return 0;
    if (l->run->io.direction == KVM_EXIT_IO_IN)
        store_le(data, size, 0xffffffffu);
    return 1;
}

/* A KVM_EXIT_MMIO to memory nobody owns, on pages MmioBus has reported and
 * no device touches (MmioBus.unowned_pages): complete it as MmioBus would --
 * a write vanishes, a read is 0, QEMU 7.2's answer (softmmu/memory.c,
 * unassigned_mem_read) -- without coming back to Python.  The list is short
 * (REPORT_LIMIT pages at most, and a guest that probes memory touches one
 * or two), so a scan costs less than anything smarter would.
 * 1: done; 0: the Python path must take it. */
static int complete_unowned_mmio(struct loop *l)
{
    struct kvm_run *run = l->run;
    uint64_t addr = run->mmio.phys_addr, len = run->mmio.len, first, last, n;
    int seen_first = 0, seen_last = 0;

    if (!l->mmio_pages || (len != 1 && len != 2 && len != 4 && len != 8) || addr > UINT64_MAX - (len - 1))
        return 0;
    first = addr >> 12;
    last = (addr + len - 1) >> 12;
    n = l->mmio_pages[0];
    if (n > (uint64_t)l->mmio_slots)
        return 0;  /* never, from MmioBus; let Python answer */
    for (uint64_t i = 1; i <= n; i++) {
        seen_first |= l->mmio_pages[i] == first;
        seen_last |= l->mmio_pages[i] == last;
    }
    if (!seen_first || !seen_last)
        return 0;
    if (!run->mmio.is_write)
        memset(run->mmio.data, 0, len);
    return 1;
}

/* Complete one KVM_EXIT_IO on its device.  1: done; 0: not ours, the Python
 * path must take it; -1: the device raised. */
static int dispatch_io(struct loop *l)
{
    struct kvm_run *run = l->run;
    int size = run->io.size, port = run->io.port;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    PyObject *entry, *device, *args[4], *r;
    long base, length, offset;

    if (run->io.count != 1 || (size != 1 && size != 2 && size != 4))
        return 0;
    if (run->io.data_offset + (uint64_t)size > (uint64_t)l->run_size)
        return 0;  /* never happens with a sane kernel; let Python complain */
    entry = PyList_GET_ITEM(l->slots, port);
    if (entry == Py_None)
        return complete_unowned(l, port, size, data);
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 5)
        return 0;
    device = PyTuple_GET_ITEM(entry, 0);
    base = PyLong_AsLong(PyTuple_GET_ITEM(entry, 1));
    length = PyLong_AsLong(PyTuple_GET_ITEM(entry, 2));
    if ((base == -1 || length == -1) && PyErr_Occurred())
        return -1;
    offset = port - base;
    if (offset < 0 || offset + size > length || (offset & (size - 1)))
        return 0;  /* off the end or unaligned: PortBus splits it */

    if (size == 1) {
        /* The device's own handler for this byte register, if it has them
         * (PortBus.table's fourth and fifth items): one call, no io_write
         * in between to find it. */
        PyObject *handlers = PyTuple_GET_ITEM(entry, run->io.direction == KVM_EXIT_IO_OUT ? 4 : 3);
        if (handlers != Py_None) {
            if (!PyTuple_CheckExact(handlers) || PyTuple_GET_SIZE(handlers) != length)
                return 0;
            PyObject *fn = PyTuple_GET_ITEM(handlers, offset);
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                PyObject *arg = PyLong_FromUnsignedLong(data[0]);  /* a cached small int */
                if (!arg)
                    return -1;
                r = PyObject_CallOneArg(fn, arg);
                Py_DECREF(arg);
                if (!r)
                    return -1;
            } else {
                long value;
                if (!(r = PyObject_CallNoArgs(fn)))
                    return -1;
                value = PyLong_AsLong(r);
                if (value == -1 && PyErr_Occurred()) {
                    Py_DECREF(r);
                    return -1;
                }
                if (value < 0 || value > 0xff) {
                    PyErr_Format(PyExc_OverflowError, "%R (the byte reader of %R at offset %ld) "
                                 "returned %R: not a byte", fn, device, offset, r);
                    Py_DECREF(r);
                    return -1;
                }
                data[0] = (uint8_t)value;
            }
            Py_DECREF(r);
            return 1;
        }
    }
    args[0] = device;
    args[1] = PyLong_FromLong(offset);
    args[2] = PyLong_FromLong(size);
    if (!args[1] || !args[2])
        goto fail;
    if (run->io.direction == KVM_EXIT_IO_OUT) {
        if (!(args[3] = PyLong_FromUnsignedLong(load_le(data, size))))
            goto fail;
        r = PyObject_VectorcallMethod(s_io_write, args, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(args[3]);
        if (!r)
            goto fail;
    } else {
        unsigned long value, mask = size == 4 ? 0xffffffffUL : (1UL << (8 * size)) - 1;
        r = PyObject_VectorcallMethod(s_io_read, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (!r)
            goto fail;
        value = PyLong_AsUnsignedLong(r);
        if (value == (unsigned long)-1 && PyErr_Occurred()) {
            Py_DECREF(r);
            goto fail;
        }
        if (value > mask) {
            PyErr_Format(PyExc_OverflowError, "%R.io_read(%ld, %d) returned %R: "
                         "not a %d-byte value", device, offset, size, r, size);
            Py_DECREF(r);
            goto fail;
        }
        store_le(data, size, (uint32_t)value);
    }
    Py_DECREF(r);
    Py_DECREF(args[1]);
    Py_DECREF(args[2]);
    return 1;
fail:
    Py_XDECREF(args[1]);
    Py_XDECREF(args[2]);
    return -1;
}

static PyObject *cpu_exec_run(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    struct loop l = {0};
    PyObject *lock;
    Py_buffer page, counter, reported, mmio = {0};
    volatile uint64_t *io_exits;
    PyObject *result = NULL;
    int ret = 0, done;

    if (argc < 5 || argc > 7) {
        PyErr_SetString(PyExc_TypeError,
                        "run(fd, run_page, mutex, table, io_exits[, reported[, mmio_pages]]) "
                        "takes 5 to 7 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(argv[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "fd out of range");
        return NULL;
    }
    l.fd = (int)fd;
    if (!PyList_CheckExact(argv[3]) || PyList_GET_SIZE(argv[3]) < PORT_COUNT) {
        PyErr_SetString(PyExc_TypeError, "table must be PortBus.table, a list with an entry per port");
        return NULL;
    }
    if (PyObject_GetBuffer(argv[4], &counter, PyBUF_WRITABLE) < 0)
        return NULL;
    if (counter.len < (Py_ssize_t)sizeof(uint64_t) * (argc == 7 ? 2 : 1) || ((uintptr_t)counter.buf & 7)) {
        PyErr_SetString(PyExc_ValueError, argc == 7
                        ? "io_exits must be an aligned 16-byte buffer with mmio_pages, e.g. array('Q', [0, 0])"
                        : "io_exits must be an aligned 8-byte buffer, e.g. array('Q', [0])");
        PyBuffer_Release(&counter);
        return NULL;
    }
    io_exits = counter.buf;
    if (argc >= 6) {
        /* Read-only here.  PortBus sets a flag when it reports a port, on the
         * Python path of some vCPU thread, with the mutex held; we read the
         * flags with the mutex held too, so never while one is being set. */
        if (PyObject_GetBuffer(argv[5], &reported, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&counter);
            return NULL;
        }
        if (reported.len < PyList_GET_SIZE(argv[3])) {  /* a flag for every entry of table */
            PyErr_SetString(PyExc_ValueError, "reported must be PortBus.reported, a flag per port of table");
            PyBuffer_Release(&reported);
            PyBuffer_Release(&counter);
            return NULL;
        }
        l.reported = reported.buf;
    }
    if (argc == 7) {
        /* Read-only here, and read with the mutex held, as MmioBus changes it. */
        if (PyObject_GetBuffer(argv[6], &mmio, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&reported);
            PyBuffer_Release(&counter);
            return NULL;
        }
        if (mmio.len < 2 * (Py_ssize_t)sizeof(uint64_t) || ((uintptr_t)mmio.buf & 7)) {
            PyErr_SetString(PyExc_ValueError, "mmio_pages must be MmioBus.unowned_pages, "
                            "aligned uint64s: a count, then pages");
            PyBuffer_Release(&mmio);
            PyBuffer_Release(&reported);
            PyBuffer_Release(&counter);
            return NULL;
        }
        l.mmio_pages = mmio.buf;
        l.mmio_slots = mmio.len / (Py_ssize_t)sizeof(uint64_t) - 1;
    }
    if (PyObject_GetBuffer(argv[1], &page, PyBUF_WRITABLE) < 0) {
        if (l.mmio_pages)
            PyBuffer_Release(&mmio);
        if (l.reported)
            PyBuffer_Release(&reported);
        PyBuffer_Release(&counter);
        return NULL;
    }
    if (page.len < (Py_ssize_t)sizeof(struct kvm_run)) {
        PyErr_SetString(PyExc_ValueError, "run_page is smaller than struct kvm_run");
        goto out;
    }
    l.run = page.buf;
    l.run_size = page.len;
    l.mutex = argv[2];
    l.slots = argv[3];
    if (!(lock = PyObject_GetAttr(l.mutex, s_raw_lock)))
        goto out;
    if (Py_IS_TYPE(lock, &QemuMutex_Type))
        l.raw = (QemuMutex *)lock;  /* kept alive by the mutex, which the caller holds */
    l.owner_offset = -1;
    {
        /* type(mutex).owner: a member descriptor when owner is a slot;
         * anything else (or nothing: owner in the instance's dict) is
         * written through PyObject_SetAttr */
        PyObject *descr = PyObject_GetAttr((PyObject *)Py_TYPE(l.mutex), s_owner);
        if (!descr) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                Py_DECREF(lock);
                goto out;
            }
            PyErr_Clear();
        } else if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
            if (m->type == T_OBJECT_EX && !(m->flags & READONLY))
                l.owner_offset = m->offset;
            Py_DECREF(descr);
        } else {
            Py_DECREF(descr);
        }
    }
    l.release = PyObject_GetAttr(lock, s_release);
    l.acquire = l.release ? PyObject_GetAttr(lock, s_acquire) : NULL;
    Py_DECREF(lock);
    if (!l.release || !l.acquire ||
        !(l.contended = PyObject_GetAttr(l.mutex, s_contended)) ||
        !(l.ident = PyLong_FromUnsignedLong(PyThread_get_thread_ident())))
        goto out;

    for (;;) {
        if (run_once(&l, &ret) < 0)
            goto out;
        if (ret >= 0 && l.run->exit_reason == KVM_EXIT_MMIO && complete_unowned_mmio(&l)) {
            io_exits[1]++;
            continue;
        }
        if (ret < 0 || l.run->exit_reason != KVM_EXIT_IO) {
            if (ret >= 0)
                ret = (int)l.run->exit_reason;
            break;
        }
        done = dispatch_io(&l);
        if (done < 0)
            goto out;
        if (done == 0) {
            ret = KVM_EXIT_IO;
            break;
        }
        (*io_exits)++;
    }
    result = PyLong_FromLong(ret);
out:
    Py_XDECREF(l.release);
    Py_XDECREF(l.acquire);
    Py_XDECREF(l.contended);
    Py_XDECREF(l.ident);
    PyBuffer_Release(&page);
    PyBuffer_Release(&counter);
    if (l.reported)
        PyBuffer_Release(&reported);
    if (l.mmio_pages)
        PyBuffer_Release(&mmio);
    return result;
}

static PyMethodDef methods[] = {
    {"run", (PyCFunction)(void (*)(void))cpu_exec_run, METH_FASTCALL,
     "run(fd, run_page, mutex, table, io_exits[, reported[, mmio_pages]]) -> ret: KVM_RUN\n"
     "with qemu_mutex dropped, completing port I/O on PortBus devices (and on unowned\n"
     "ports, and MMIO to unowned pages, already reported), until an exit the caller\n"
     "must handle."},
    {NULL, NULL, 0, NULL},
};

#ifndef QKIO_SOURCE_CRC32
#error "build with setup.py, which defines QKIO_SOURCE_CRC32 (the CRC-32 of this file)"
#endif

static int cpu_exec_exec(PyObject *m)
{
    if (!s_owner && (
        !(s_owner = PyUnicode_InternFromString("owner")) ||
        !(s_raw_lock = PyUnicode_InternFromString("raw_lock")) ||
        !(s_release = PyUnicode_InternFromString("release")) ||
        !(s_acquire = PyUnicode_InternFromString("acquire")) ||
        !(s_contended = PyUnicode_InternFromString("lock_contended")) ||
        !(s_io_read = PyUnicode_InternFromString("io_read")) ||
        !(s_io_write = PyUnicode_InternFromString("io_write"))))
        return -1;
    if (PyType_Ready(&QemuMutex_Type) < 0 ||
        PyModule_AddObjectRef(m, "QemuMutex", (PyObject *)&QemuMutex_Type) < 0 ||
        PyModule_AddIntConstant(m, "SOURCE_CRC32", (long)QKIO_SOURCE_CRC32) < 0)
        return -1;
    return 0;
}

/* What the module declares to the interpreter.
 *
 * Py_mod_gil = Py_MOD_GIL_USED: on a free-threaded CPython (3.13t and later)
 * importing this module turns the GIL back on.  The loop is written for a
 * world with a GIL: it walks PortBus.table with PyList_GET_ITEM and keeps
 * the borrowed table entry (and its byte handlers) while it calls the device --
 * safe only because no other thread can run PortBus.register() meanwhile --
 * and QemuMutex's `locked` flag is a plain char that locked() reads from any
 * thread.  Declaring it GIL-free would need atomics and critical sections in
 * both places; until then, correct and slower beats fast and racy.
 *
 * Py_mod_multiple_interpreters = not supported: QemuMutex is a static type
 * and the interned names are process-wide, which interpreters with their own
 * GIL may not share.  (qkio has one interpreter.)
 *
 * Both slots exist only in newer Pythons (3.13, 3.12); older ones assume
 * exactly this. */
static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, cpu_exec_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_cpu_exec",
    .m_doc = "qkio's vCPU exit loop for port I/O, in C.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC PyInit__cpu_exec(void)
{
    return PyModuleDef_Init(&module_def);
}
