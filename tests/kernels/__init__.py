"""Multiboot kernels made from bytes (synthetic.py), for tests that need no toolchain.

The kernels that run are qkio's guests, in qkio/guests (one guest tree).
"""
