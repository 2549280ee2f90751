"""Hazards where the Triton interpreter and a compiled kernel part ways, pinned on CPU where
a consequence shows there (see also tests/compile_for_gpu.py's rules for the GPU side)."""

import pytest
import torch

import fastflow as ff

from conftest import DEVICE


def _calls():
    """name -> (the (float64 main, other) inputs, the call): ops whose gradient of the other
    argument is computed in float64 and stored in that argument's dtype."""
    def coupling(c_h):
        return lambda: (torch.randn(2, 5, 3, 4, dtype=torch.float64, device=DEVICE),
                        0.5 * torch.randn(2, c_h, 3, 4, device=DEVICE))

    eps = torch.randn(3, 6, device=DEVICE).to(torch.bfloat16)  # fixed, in a third dtype
    return {
        "affine_coupling": (coupling(4), lambda a, b: ff.affine_coupling(a, b)),
        "additive_coupling": (coupling(2), lambda a, b: ff.additive_coupling(a, b)),
        "reparameterize_kl": (lambda: (torch.randn(3, 6, dtype=torch.float64, device=DEVICE),
                                       torch.randn(3, 6, device=DEVICE)),
                              lambda a, b: ff.reparameterize_kl(a, b, eps)),
        "tarflow_head": (lambda: (torch.randn(2, 5, 3, dtype=torch.float64, device=DEVICE),
                                  0.5 * torch.randn(2, 5, 6, device=DEVICE)),
                         lambda a, b: ff.tarflow_head(a, b, clamp=2.0)),
    }


@pytest.mark.parametrize("other", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(_calls()))
def test_float64_values_stored_into_16_bit_gradients(name, other):
    """A float64 input with a 16-bit other argument: that argument's gradient is computed in
    float64 and stored in 16 bits. The interpreter turned a direct float64 -> bfloat16
    conversion into garbage (NaN, 1e-41), and a compiled kernel's direct conversion rounds
    once where torch's ``.to`` rounds through float32: now every store goes through
    ``rounded_for``, so the gradient is the float64 one rounded as torch rounds it."""
    torch.manual_seed(0)
    make, call = _calls()[name]
    a0, b0 = make()
    b0 = b0.to(other)

    def grad_of_b(b_dtype):
        a = a0.clone().requires_grad_(True)
        b = b0.to(b_dtype).requires_grad_(True)
        out, ld = call(a, b)
        return torch.autograd.grad(out.square().sum() + ld.sum(), b)[0]

    with ff.use_backend("triton"):
        got, want = grad_of_b(other), grad_of_b(torch.float64).to(other)
    assert got.dtype == other and torch.isfinite(got).all()
    if DEVICE == "cpu" and other == torch.bfloat16:
        # the interpreter truncates float32 -> bfloat16 (a compiled kernel rounds): one ulp
        torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(other).eps, atol=0)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _script_function(name: str):
    """A function of tests/compile_for_gpu.py, from its source (importing the script would
    unset TRITON_INTERPRET for this process)."""
    import ast
    import re
    from pathlib import Path

    tree = ast.parse(Path(__file__).with_name("compile_for_gpu.py").read_text())
    (f,) = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == name]
    scope = {"re": re}
    exec(compile(ast.Module([f], []), "compile_for_gpu.py", "exec"), scope)
    return scope[name]


def test_compile_check_sees_direct_float64_to_16_bit_conversions():
    """The compile check's PTX rule: a direct conversion (what ``.to(bf16)`` of a float64
    value compiles to, before ``rounded_for``) is named; the float32 ones are not."""
    rule = _script_function("direct_float64_to_16_bit")
    ptx = ("cvt.rn.bf16.f64 %rs1, %fd1;\n cvt.rn.f16.f64 %rs2, %fd2;\n"
           "cvt.rn.bf16.f32 %rs3, %f1;\n cvt.f64.f32 %fd3, %f2;\n cvt.f32.bf16 %f3, %rs4;")
    assert rule(ptx) == ["cvt.rn.bf16.f64", "cvt.rn.f16.f64"]
    assert rule("cvt.rn.f16.f32 %rs1, %f1;\n cvt.rn.bf16x2.f32 %r1, %f1, %f2;") == []


def test_compile_check_sees_int32_products_of_a_program_id():
    """The compile check's int32 rule: besides a product of two arguments it names a program
    id (or a value derived from one) times an argument, an offset that wraps past 2^31 in a
    big launch where each factor fits (it used to see only argument * argument); a product
    with a constant (a block size) or in int64 is fine."""
    rule = _script_function("int32_argument_products")
    ttir = """tt.func public @k(%x_ptr: !tt.ptr<f32>, %C: i32, %STRIDE: i32, %N: i64) attributes {} {
    %c64_i32 = arith.constant 64 : i32
    %pid = tt.get_program_id x : i32
    %off = arith.muli %pid, %STRIDE : i32
    %row = arith.divsi %pid, %C : i32
    %off2 = arith.muli %row, %STRIDE : i32
    %blk = arith.muli %pid, %c64_i32 : i32
    %cc = arith.muli %C, %C : i32
    %t = tt.splat %STRIDE : i32 -> tensor<16xi32>
    %r = tt.make_range {end = 16 : i32, start = 0 : i32} : tensor<16xi32>
    %v = arith.muli %r, %t : tensor<16xi32>
    %p64 = arith.extsi %pid : i32 to i64
    %w = arith.muli %p64, %N : i64
"""
    assert rule(ttir) == ["C * C", "arith.divsi * STRIDE", "tt.get_program_id * STRIDE",
                          "tt.make_range * tt.splat"]
