"""Triton kernels of mu_fast, installed as ``mu_fast.kernels`` (one kernel per file, launcher beside it)."""
