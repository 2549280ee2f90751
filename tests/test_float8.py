"""DESIGN.md names four floating dtypes (float16, bfloat16, float32, float64): a float8
tensor given to a public op or layer is refused with a TypeError that names the argument,
the accepted dtypes and the given one, on both backends (before, every op ran it through
math never specified for it and returned whatever that gave)."""

import pytest
import torch

import fastflow as ff
from fastflow.ops.lu_weight import lu_weight_logdet

from conftest import DEVICE

FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2")
          if hasattr(torch, name)]


def _refused(name, dtype, fn):
    want = (rf"^{name}: expected a floating-point tensor \(float16, bfloat16, float32 or "
            rf"float64\), got dtype {str(dtype).replace('.', '[.]')}$")
    with pytest.raises(TypeError, match=want):
        fn()


def _args(names, **shapes):
    """float32 tensors on DEVICE, by name."""
    return {k: torch.randn(shapes[k], device=DEVICE) for k in names}


# op, the float arguments (name: shape), and how to call it with them
CASES = {
    "affine_coupling": (dict(x=(2, 4, 3, 3), h=(2, 4, 3, 3)),
                        lambda a: ff.affine_coupling(a["x"], a["h"])),
    "affine_coupling reverse": (dict(x=(2, 4, 3, 3), h=(2, 4, 3, 3)),
                                lambda a: ff.affine_coupling(a["x"], a["h"], reverse=True)),
    "additive_coupling": (dict(x=(2, 4, 3, 3), h=(2, 2, 3, 3)),
                          lambda a: ff.additive_coupling(a["x"], a["h"])),
    "channel_mix": (dict(x=(2, 4, 3, 3), weight=(4, 4), loc=(4,), scale=(4,)),
                    lambda a: ff.channel_mix(a["x"], a["weight"], loc=a["loc"],
                                             scale=a["scale"])),
    "actnorm_invconv": (dict(x=(2, 4, 3, 3), loc=(4,), scale=(4,), weight=(4, 4),
                             weight_logdet=()),
                        lambda a: ff.actnorm_invconv(a["x"], a["loc"], a["scale"], a["weight"],
                                                     a["weight_logdet"])),
    "reparameterize_kl": (dict(mu=(3, 5), logvar=(3, 5), eps=(3, 5)),
                          lambda a: ff.reparameterize_kl(a["mu"], a["logvar"], a["eps"])),
    "tarflow_head": (dict(x=(2, 3, 4), h=(2, 3, 8)),
                     lambda a: ff.tarflow_head(a["x"], a["h"])),
    "lu_weight_logdet": (dict(lower=(4, 4), upper=(4, 4), log_s=(4,), sign_s=(4,), scale=(4,)),
                         lambda a: lu_weight_logdet(a["lower"], a["upper"], a["log_s"],
                                                    a["sign_s"], torch.arange(4, device=DEVICE),
                                                    scale=a["scale"])),
}
PARAMS = [(op, name) for op, (shapes, _) in CASES.items() for name in shapes]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
@pytest.mark.parametrize("op,name", PARAMS, ids=[f"{op}-{name}" for op, name in PARAMS])
def test_float8_argument_is_refused(backend, op, name, dtype):
    shapes, call = CASES[op]
    args = _args(shapes, **shapes)
    call(args)  # float32 throughout: runs
    args[name] = args[name].to(dtype)
    _refused(name, dtype, lambda: call(args))


def test_float8_ld_dtype_is_refused(backend):
    args = _args(["lower", "upper", "log_s", "sign_s"], lower=(4, 4), upper=(4, 4), log_s=(4,),
                 sign_s=(4,))
    with pytest.raises(TypeError, match=r"^ld_dtype: expected .*float64.*got torch.float8_e4m3fn$"):
        lu_weight_logdet(args["lower"], args["upper"], args["log_s"], args["sign_s"],
                         torch.arange(4, device=DEVICE), ld_dtype=torch.float8_e4m3fn)


@pytest.mark.parametrize("layer", ["AffineCoupling", "ActNorm", "InvConv2dLU", "FlowStep",
                                   "GaussianReparam"])
def test_float8_input_to_a_layer_is_refused(backend, layer):
    dtype = torch.float8_e4m3fn
    if layer == "GaussianReparam":
        mu = torch.randn(3, 5, device=DEVICE)
        _refused("mu", dtype, lambda: ff.GaussianReparam()(mu.to(dtype), mu))
        return
    kwargs = {"filter_size": 8} if layer in ("AffineCoupling", "FlowStep") else {}
    module = getattr(ff, layer)(4, **kwargs).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    _refused("x", dtype, lambda: module(x.to(dtype)))
