"""Triton kernels and their launchers (tensors in, tensors out, no autograd).

Installed as ``fastflow.kernels``. Importing this package compiles nothing and queries no
device; each kernel is compiled for its device on first launch.

``FAMILIES`` is the one list of kernel families (one module each): the GPU compile check,
the tests and the benchmarks iterate it, so a new family is added here (plus its exercise in
tests/compile_for_gpu.py, which a test checks). Each family module exposes
``launch_configs(...) -> {kernel name: _layout.Launch}`` (grid, block sizes, num_warps,
num_stages) for given shapes, e.g. for programs per launch in the benchmark tables:

    coupling.launch_configs(n, c, hw, channels_fast=False)
    channel_mix.launch_configs(n, c, hw, dtype, co=None, diag=False, reverse=False, actnorm=True)
    lu_weight.launch_configs(c, n)
    gaussian.launch_configs(n, d)
"""

FAMILIES = {
    "coupling": "affine / additive coupling fused with its log-det (forward, inverse, backward)",
    "channel_mix": "ActNorm folded into the invertible 1x1 convolution, and its backward",
    "lu_weight": "LU-parameterised 1x1-convolution weight and the whole step's log-det",
    "gaussian": "VAE reparameterisation fused with the KL term, noise drawn in the kernel",
    "tarflow": "TarFlow affine head: shift, clamp, affine map, log-det and token order (all tokens or one)",
}
