"""The C library, loaded once for every module that calls it through ctypes.

By its soname, not through ``ctypes.util.find_library("c")``: that helper
runs ``ldconfig -p`` (and sometimes gcc) in a subprocess to find the file,
which would put extra processes and a SIGCHLD into every VMM start -- noise
in the very strace excerpts and signal experiments this book shows.  glibc's
soname has been ``libc.so.6`` on Linux for decades.

``use_errno=True`` makes ctypes save ``errno`` right after each call, so
``ctypes.get_errno()`` reports the call's own error even when other Python
code runs in between.  Calls through this ``CDLL`` release the GIL.
"""

import ctypes

libc = ctypes.CDLL("libc.so.6", use_errno=True)
