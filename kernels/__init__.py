"""Triton kernels, each beside its pure-PyTorch reference (the CPU path and the test oracle)."""
