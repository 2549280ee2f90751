"""Argument checks shared by the ops: each error names the argument, what was expected and
what was given."""

from __future__ import annotations

import math
import numbers

import torch


# DESIGN.md's floating dtypes, the only ones the ops take: float8 (and any other floating
# dtype torch adds) is refused, not run through math it was never specified for.
FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def check_float_tensor(name: str, t, ndim: int | None = None, min_ndim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)} "
                         f"({t.dim()}-D)")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape "
                         f"{tuple(t.shape)}")


def check_nchw(name: str, x, channels: int):
    """``x`` must be a floating (N, channels, H, W) tensor."""
    check_float_tensor(name, x, ndim=4)
    if x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, shape (N, {channels}, H, W), "
                         f"got shape {tuple(x.shape)}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor):
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref_name}'s device {ref.device}, got {t.device}")


def check_module_device(name: str, t: torch.Tensor, param):
    """``t``, an input of a module, must be on the device of ``param``, one of the module's
    parameters (None: a module without any, nothing to check). Checked before the module
    does anything with ``t`` (an ActNorm initialises from nothing it then refuses)."""
    if param is not None and t.device != param.device:
        raise ValueError(f"{name}: expected a tensor on the module's device {param.device} "
                         f"(where its parameters are), got {t.device}")


def first_parameter(module):
    """One parameter of ``module`` (its device is the module's), or None when it has none."""
    return next(module.parameters(), None)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_bool(name: str, value) -> bool:
    """A flag must be a bool (``reverse="no"`` is refused, not taken as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool (True or False), got {value!r} "
                        f"({type(value).__name__})")
    return value


def check_count(name: str, value, minimum: int = 1,
                what: str = "a positive channel count") -> int:
    """A size (channel count, width) must be an integer (a bool is refused, though
    ``isinstance(True, int)``) of at least ``minimum``; returned as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected {what} (an integer), got {value!r} "
                        f"({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    """A numeric option must be a finite positive real number; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a finite positive number, got {value!r} "
                        f"({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    return value


def check_finite(name: str, value) -> float:
    """A finite real number (not a bool), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a finite number, got {value!r} "
                        f"({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def assert_on_device(ok: torch.Tensor, message: str):
    """Check ``ok`` (a boolean tensor, true when an input is valid) where its values are,
    without the host waiting for them: for inputs off the CPU (whose checks read values
    and raise a ValueError there). ``torch._assert_async`` queues a device-side assert
    (no host sync, traced by ``torch.compile(fullgraph=True)``): a failed one raises at a
    later synchronisation (on CUDA as a device-side assert, after which the process's CUDA
    context is unusable: an input error there, not a recoverable exception)."""
    torch._assert_async(ok, message)
