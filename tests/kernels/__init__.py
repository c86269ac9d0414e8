"""Multiboot test kernels written apart from qkio, and the code that builds them."""
