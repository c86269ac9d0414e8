"""``qkio run``'s command line read without argparse (``qkio.cli._parse_run_plainly``)
means exactly what argparse reads, or is left to argparse.

The plain reader exists for start-up time (``qkio bench startup``): a
well-formed ``qkio run`` never imports argparse.  The law checked here: for
any command line, the plain reader either declines (None) or returns what
argparse's parser returns -- the same options, values, types and defaults;
and wherever argparse would refuse the line (status 1, its one-line
message), the plain reader has declined, so the message is argparse's.
"""

from __future__ import annotations

import contextlib
import io
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkio import cli

FLAGS = sorted({flag for flags, _ in cli.RUN_OPTIONS for flag in flags})
VALUES = ["x", "hello", "", "-", "-1", "0", "1", "2", "64", "65", "3072", "3073", "2.5", "nan", "inf",
          "1e6", "1e7", "signalfd", "thread", "async", "eventfd", "pipe", "select", "epoll", "alarm",
          "native", "python", "bogus", "file=a.img", "file=b,readonly=on", "a=b", "--", "-x", " ", "ioeventfd=on"]
TOKENS = [*FLAGS, "--kern", "--mem", "--pi", "--help", "-h", "--version", "-m64", "-m=64", "--pit=1", "pos"]


def _argparse(argv):
    """argparse's reading of ``qkio run ARGV``: a dict, or "refused" (SystemExit)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return vars(cli.build_parser().parse_args(["run", *argv]))
        except SystemExit:
            return "refused"


def _token():
    flag_value = st.builds(lambda f, v: f"{f}={v}", st.sampled_from(FLAGS), st.sampled_from(VALUES))
    return st.one_of(st.sampled_from(TOKENS), st.sampled_from(VALUES), flag_value)


@settings(max_examples=400, deadline=None)
@given(st.lists(_token(), max_size=8))
def test_the_plain_reader_agrees_with_argparse_or_declines(argv):
    plain = cli._parse_run_plainly(argv)
    if plain is not None:
        assert vars(plain) == _argparse(argv)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FLAGS), st.sampled_from(VALUES)), max_size=6),
       st.sampled_from(["x", "hello", "a b"]))
def test_well_formed_lines_agree(pairs, kernel):
    """Mostly valid lines (option, value pairs and a kernel), so that agreeing is tested, not declining."""
    argv = ["--kernel", kernel]
    for flag, value in pairs:
        argv += [flag] if flag == "--pit" else [flag, value]
    plain = cli._parse_run_plainly(argv)
    if plain is not None:
        assert vars(plain) == _argparse(argv)


@pytest.mark.parametrize("line", [
    "--kernel hello",
    "--kernel=k.elf --append 'console=ttyS0 x=1' -m 64 --smp 2 --timeout 2.5",
    "--kernel k --signals thread --notify pipe --backend epoll --kick signal_mask --clock alarm",
    "--kernel k --exit-path python --pit --trace t.json --initrd a,b",
    "--kernel k --drive file=a.img --drive file=b.img,readonly=on --virtio-notify main --virtio-aio paio",
])
def test_the_usual_lines_are_read_plainly(line):
    """What the book, the benchmarks and users type takes the plain path, and means the same."""
    argv = shlex.split(line)
    plain = cli._parse_run_plainly(argv)
    assert plain is not None
    assert vars(plain) == _argparse(argv)


@pytest.mark.parametrize("line", ["", "--help", "--kern k", "--kernel k --smp 0", "--kernel k --signals x",
                                  "--kernel k --append -x", "--kernel k pos", "-m 64", "--kernel k --pit=1"])
def test_everything_else_is_left_to_argparse(line):
    assert cli._parse_run_plainly(shlex.split(line)) is None
