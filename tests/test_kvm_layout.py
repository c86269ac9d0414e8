"""Every number qkio.kvm shares with the kernel, checked against <linux/kvm.h>.

``qkio/kvm/structs.py`` mirrors the kernel's structs in ctypes, and
``qkio/kvm/ioctl.py`` rebuilds the ioctl numbers from their sizes.  A wrong
field type shifts every field after it; a wrong size changes the ioctl number,
and the kernel answers ENOTTY -- or, worse, copies the wrong number of bytes.
Nothing here is trusted by eye: this file writes a C program that includes the
real ``<linux/kvm.h>`` and prints

* ``sizeof`` of every struct in structs.py, and the offset and size of every
  field, nested members included (``kvm_run.exit.io.port`` is
  ``offsetof(struct kvm_run, io.port)`` in C: the kernel's exit union is
  anonymous, qkio calls it ``exit``);
* the value of every ioctl number in ``qkio.kvm.ioctl.IOCTLS``;
* every ``ExitReason`` and ``Cap`` and every constant in constants.py;

compiles it with gcc, runs it, and compares.  The Python side is read from
``_fields_``, so a field added to structs.py is checked without editing this
file.  There is one test item per struct, per ioctl and per constant, so a
failure names the culprit.

If the whole program does not compile (a field name the kernel does not have,
say), each struct's section is compiled on its own, so only the culprit fails,
with gcc's message.  Output is cached in the temp directory, keyed by the
program's text and the header's bytes.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from qkio.kvm import constants, structs
from qkio.kvm.ioctl import IOCTLS

HEADER = Path("/usr/include/linux/kvm.h")
CACHE = Path(tempfile.gettempdir()) / "qkio-kvm-layout"

# --- the Python side ---------------------------------------------------------

_COMPOSITE = (ctypes.Structure, ctypes.Union)


def _is_composite(t) -> bool:
    return isinstance(t, type) and issubclass(t, _COMPOSITE)


def _defined_here(t) -> bool:
    return t.__module__ == structs.__name__ and not t.__name__.startswith("_")


# Members of struct kvm_run that the kernel declares inline, without a type
# name of their own: they are checked through kvm_run, as kvm_run.exit.io...
NESTED_ONLY = {name for name, t in vars(structs).items()
               if _is_composite(t) and _defined_here(t) and name.startswith("kvm_run_")}
STRUCTS = sorted(name for name, t in vars(structs).items()
                 if _is_composite(t) and _defined_here(t) and name not in NESTED_ONLY)

# Structs that qkio mirrors only up to a member: kvm_run stops before the
# register-sync union ``s`` (2 KiB that qkio does not use).  Their size must be
# that member's offset; the rest of the page is mapped but never named.
HEAD_ONLY = {"kvm_run": "s"}

# Python member names that have no name in C: the kernel's kvm_run exit union
# is anonymous, so kvm_run.exit.io.port is io.port in C.
ANONYMOUS = {("kvm_run", "exit")}


def python_fields(struct, struct_name=None, py_prefix="", c_prefix="", base=0):
    """Yield ``(python path, C path, offset, size)`` for every field, recursively.

    Arrays are leaves (their element type is checked by the size); nested
    structs and unions are walked, their offsets added to the parent's.
    """
    struct_name = struct_name or struct.__name__
    for name, ftype, *_ in struct._fields_:
        desc = getattr(struct, name)
        py_path = py_prefix + name
        offset = base + desc.offset
        if (struct_name, name) in ANONYMOUS:
            c_path = c_prefix
        else:
            c_path = c_prefix + name
            yield py_path, c_path, offset, desc.size
            c_path += "."
        if _is_composite(ftype):
            yield from python_fields(ftype, ftype.__name__, py_path + ".", c_path, offset)


def _flexible_tails():
    """The header-plus-N-entries types that structs.py builds for variable-length structs."""
    return {
        "kvm_cpuid2": ("entries", type(structs.cpuid2_with(1))),
        "kvm_msrs": ("entries", type(structs.msrs_with([(0, 0)]))),
        "kvm_signal_mask": ("sigset", type(structs.signal_mask_with(bytes(8)))),
    }


FLEXIBLE = _flexible_tails()


def _constants() -> dict[str, int]:
    """Every named number qkio takes from <linux/kvm.h>, by its C macro name."""
    out = {f"KVM_EXIT_{r.name}": int(r) for r in constants.ExitReason}
    out.update({f"KVM_CAP_{c.name}": int(c) for c in constants.Cap})
    out.update({name: value for name, value in vars(constants).items()
                if name.startswith("KVM_") and isinstance(value, int)
                and not isinstance(value, enum.Enum)})
    # Constants that live on the struct classes or in structs.py.
    out["KVM_NR_INTERRUPTS"] = structs.KVM_NR_INTERRUPTS
    out["KVM_APIC_REG_SIZE"] = structs.kvm_lapic_state.KVM_APIC_REG_SIZE
    out["KVM_EXIT_IO_IN"] = structs.kvm_run_io.KVM_EXIT_IO_IN
    out["KVM_EXIT_IO_OUT"] = structs.kvm_run_io.KVM_EXIT_IO_OUT
    return out


CONSTANTS = _constants()

# --- the C side ----------------------------------------------------------------

PRELUDE = """\
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>
#define FIELD(T, path) \\
    printf("field %s %s %zu %zu\\n", #T, #path, offsetof(struct T, path), \\
           sizeof(((struct T *)0)->path))
#define SIZE(T) printf("size %s %zu\\n", #T, sizeof(struct T))
#define MACRO(name, value) printf("macro %s %llu\\n", name, (unsigned long long)(value))
#define MISSING(name) printf("missing %s\\n", name)
int main(void)
{
"""


def struct_section(name: str) -> str:
    lines = [f"    SIZE({name});"]
    for _, c_path, _, _ in python_fields(getattr(structs, name)):
        lines.append(f"    FIELD({name}, {c_path});")
    if name in HEAD_ONLY:
        lines.append(f"    FIELD({name}, {HEAD_ONLY[name]});")
    if name in FLEXIBLE:
        lines.append(f"    FIELD({name}, {FLEXIBLE[name][0]}[0]);")
    return "\n".join(lines)


def macro_section(names) -> str:
    return "\n".join(f'#ifdef {n}\n    MACRO("{n}", {n});\n#else\n    MISSING("{n}");\n#endif'
                     for n in names)


def program(sections: list[str]) -> str:
    return PRELUDE + "\n".join(sections) + "\n    return 0;\n}\n"


def compile_and_run(source: str) -> tuple[str | None, str]:
    """Return ``(stdout, "")`` or ``(None, gcc's error)``.  Cached by source and header."""
    key = hashlib.sha256(source.encode() + HEADER.read_bytes()).hexdigest()[:16]
    cached = CACHE / f"{key}.out"
    if cached.exists():
        return cached.read_text(), ""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        src, exe = Path(tmp, "layout.c"), Path(tmp, "layout")
        src.write_text(source)
        gcc = subprocess.run(["gcc", "-std=gnu11", "-Wall", "-o", str(exe), str(src)],
                             capture_output=True, text=True)
        if gcc.returncode:
            return None, gcc.stderr
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    tmp_out = cached.with_suffix(".tmp")
    tmp_out.write_text(out)
    tmp_out.replace(cached)  # atomic: parallel runs never read half a file
    return out, ""


def parse(out: str) -> dict:
    facts = {}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            facts[("size", rest[0])] = int(rest[1])
        elif kind == "field":
            facts[("field", rest[0], rest[1])] = (int(rest[2]), int(rest[3]))
        elif kind == "macro":
            facts[("macro", rest[0])] = int(rest[1])
        elif kind == "missing":
            facts[("macro", rest[0])] = None
    return facts


@pytest.fixture(scope="module")
def kernel():
    """What <linux/kvm.h> says: ``facts`` from the program, ``errors`` per struct that did not compile."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot compile the <linux/kvm.h> layout probe")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} is missing: install linux-libc-dev (the kernel's uapi headers)")
    sections = {name: struct_section(name) for name in STRUCTS}
    sections[None] = macro_section(sorted(IOCTLS) + sorted(CONSTANTS))
    out, err = compile_and_run(program(list(sections.values())))
    errors = {}
    if out is None:  # find the culprit(s): compile each section alone
        out = ""
        for name, section in sections.items():
            part, err = compile_and_run(program([section]))
            if part is None:
                errors[name] = err
            else:
                out += part
    return parse(out), errors


def _fail_if_not_compiled(errors, name):
    if None in errors:
        pytest.fail(f"the ioctl/constant section did not compile:\n{errors[None]}")
    if name in errors:
        pytest.fail(f"struct {name}: the C probe does not compile against {HEADER} "
                    f"(a field name qkio has and the kernel does not?):\n{errors[name]}")


# --- the tests -----------------------------------------------------------------

@pytest.mark.parametrize("name", STRUCTS)
def test_struct_layout(kernel, name):
    facts, errors = kernel
    _fail_if_not_compiled(errors, name)
    struct = getattr(structs, name)
    mismatches = []
    if name in HEAD_ONLY:
        what = f"offsetof(struct {name}, {HEAD_ONLY[name]}) (qkio mirrors the head only)"
        c_size = facts[("field", name, HEAD_ONLY[name])][0]
    else:
        what, c_size = "sizeof", facts[("size", name)]
    if ctypes.sizeof(struct) != c_size:
        mismatches.append(f"{what}: qkio {ctypes.sizeof(struct)}, kernel {c_size}")
    for py_path, c_path, offset, size in python_fields(struct):
        c_offset, c_size = facts[("field", name, c_path)]
        if (offset, size) != (c_offset, c_size):
            mismatches.append(f"{py_path} (C {c_path}): qkio offset {offset} size {size}, "
                              f"kernel offset {c_offset} size {c_size}")
    assert not mismatches, f"struct {name} differs from <linux/kvm.h>:\n  " + "\n  ".join(mismatches)


@pytest.mark.parametrize("name", sorted(FLEXIBLE))
def test_variable_length_struct_tail(kernel, name):
    """``cpuid2_with(n)`` and friends put the entries where the kernel's flexible array starts."""
    facts, errors = kernel
    _fail_if_not_compiled(errors, name)
    member, built = FLEXIBLE[name]
    c_offset, c_size = facts[("field", name, f"{member}[0]")]
    element = getattr(built, member)
    assert element.offset == c_offset, f"{name}.{member} starts at {element.offset}, kernel {c_offset}"
    entry_type = dict((n, t) for n, t, *_ in built._fields_)[member]._type_
    assert ctypes.sizeof(entry_type) == c_size, f"one {name}.{member} element: kernel says {c_size} bytes"
    header = getattr(structs, name)
    assert ctypes.sizeof(header) == facts[("size", name)] <= element.offset


def test_every_nested_class_is_reached_from_kvm_run():
    """The anonymous kvm_run members are only checked through kvm_run: make sure they are all there."""
    reached = set()

    def walk(t):
        for _, ftype, *_ in t._fields_:
            if _is_composite(ftype):
                reached.add(ftype.__name__)
                walk(ftype)

    walk(structs.kvm_run)
    assert NESTED_ONLY <= reached, f"not part of kvm_run, so never checked: {NESTED_ONLY - reached}"


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_number(kernel, name):
    facts, errors = kernel
    _fail_if_not_compiled(errors, None)
    c_value = facts[("macro", name)]
    assert c_value is not None, f"{name} is not defined in {HEADER}"
    assert IOCTLS[name] == c_value, f"{name}: qkio {IOCTLS[name]:#010x}, kernel {c_value:#010x}"


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constant(kernel, name):
    facts, errors = kernel
    _fail_if_not_compiled(errors, None)
    c_value = facts[("macro", name)]
    assert c_value is not None, f"{name} is not defined in {HEADER}"
    assert CONSTANTS[name] == c_value, f"{name}: qkio {CONSTANTS[name]}, kernel {c_value}"


def test_the_probe_sees_what_it_should():
    """Guard the guard: the walk finds nested fields, and C paths drop the anonymous union."""
    paths = {py: c for py, c, _, _ in python_fields(structs.kvm_run)}
    assert paths["exit.io.port"] == "io.port"
    assert paths["exit.internal.suberror"] == "internal.suberror"
    assert "exit" not in paths  # no C name to check it by
    assert {"kvm_regs", "kvm_sregs", "kvm_run", "kvm_irq_level", "kvm_cpuid2"} <= set(STRUCTS)
    assert "KVM_EXIT_IO" in CONSTANTS and "KVM_CAP_IRQCHIP" in CONSTANTS
    assert "KVM_IOEVENTFD_FLAG_PIO" in CONSTANTS and "KVM_API_VERSION" in CONSTANTS
