"""Triton kernels of fastgim, installed as the package ``fastgim.kernels``."""
