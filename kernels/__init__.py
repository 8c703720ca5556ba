"""Triton kernels of erm (installed as `erm.kernels`). One module per op; the math of each op is in
the docstring of its `erm.ops` module."""
