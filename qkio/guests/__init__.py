"""qkio's demo guests: small programs kept as source and built on first use.

(Populated by the guests module; see build_guest.)
"""
GUESTS: dict = {}


def build_guest(name):
    raise KeyError(name)
