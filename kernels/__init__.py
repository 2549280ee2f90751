"""Triton kernels and their launchers (tensors in, tensors out, no autograd).

Installed as ``fastflow.kernels``. Importing this package compiles nothing and queries no
device; each kernel is compiled for its device on first launch.
"""
