"""How models and layers are stored and moved: state-dict round trips, in-place edits of
their buffers, copies. Each result is compared with a model built afresh with the same
tensors (``load_state_dict``), which is what a user expects."""

import copy
import io

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import fastflow as ff

from conftest import DEVICE


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_actnorm_flag_set_by_hand_is_read():
    """rosinality's idiom for a layer set by hand: loc and scale written, then
    ``initialized.fill_(1)``. The host-side mirror did not see the write, so the next
    training call initialised from the batch (also after a move to another device),
    overwriting loc and scale silently; and
    ``initialized.zero_()`` (initialise again from the next batch) did nothing."""
    an = ff.ActNorm(3)
    with torch.no_grad():
        an.loc.fill_(0.5)
        an.scale.fill_(2.0)
        an.initialized.fill_(1)
    an._apply(torch.clone)  # new tensors, as a move to another device makes
    x = torch.randn(4, 3, 2, 2)
    y, _ = an(x)
    torch.testing.assert_close(y, 2.0 * (x + 0.5), rtol=0, atol=0)
    an.initialized.zero_()
    an(x + 5)  # initialises from this batch
    assert an.is_initialized() and bool(an.initialized)
    torch.testing.assert_close(an.loc.flatten(), -(x + 5).mean((0, 2, 3)))


@pytest.mark.parametrize("use_buffers", [False, True])
def test_averaged_model_does_not_reinitialise(use_buffers):
    """``AveragedModel(model)``, made (a deepcopy) before the first batch, copies the
    trained model's ``initialized`` flag into its copy (in place, with or without
    ``use_buffers``): the copy, in training mode as the model was, must compute with the
    averaged loc / scale, not initialise from the batch it is called on."""
    torch.manual_seed(0)
    step = ff.FlowStep(4, filter_size=8)
    avg = AveragedModel(step, use_buffers=use_buffers)
    step(torch.randn(4, 4, 2, 2))  # initialises step's ActNorm
    avg.update_parameters(step)
    twin = ff.FlowStep(4, filter_size=8)
    twin.load_state_dict(_roundtrip(avg.module.state_dict()))
    x = 3 * torch.randn(4, 4, 2, 2) + 1
    want = twin(x)
    got = avg(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("make", [ff.InvConv2dLU, ff.FlowStep],
                         ids=["InvConv2dLU", "FlowStep"])
def test_state_copied_in_tensor_by_tensor(make, backend):
    """Another layer's state dict copied in place, tensor by tensor (``dst.state_dict()[k]
    .copy_(v)``, as a hard sync of an EMA copy does): the permutation ``w_p`` changed, and
    the row order kept for it (``w_rows``, not in a state dict) must follow, also through a
    cast made before the next call; it did not, so W was assembled with the old
    permutation (a max error of 3.7 on 4 channels, 4.1 after ``.double()``)."""
    torch.manual_seed(0)
    dst, src = make(4).to(DEVICE), make(4).to(DEVICE)
    assert not torch.equal(dst.state_dict()["w_p" if make is ff.InvConv2dLU
                                            else "invconv.w_p"],
                           src.state_dict()["w_p" if make is ff.InvConv2dLU
                                            else "invconv.w_p"])
    src_state = _roundtrip(src.state_dict())
    with torch.no_grad():
        for k, v in dst.state_dict().items():
            v.copy_(src_state[k])
    dst.double()
    src.double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=DEVICE)
    for method in ("forward", "inverse"):
        got, want = getattr(dst, method)(x), getattr(src, method)(x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_reversible_counters_after_to_empty_and_load():
    """The meta-device recipe with ``to_empty``: build under ``torch.device("meta")``,
    ``to_empty(device=...)``, ``load_state_dict``. The fallback counters are in no state
    dict, so they kept what the fresh memory held (9.4e13 and 64 in one run) and
    ``fallback_count`` reported it. A load counts from zero again; a chain whose keys the
    state dict does not hold keeps its counts."""
    torch.manual_seed(0)
    trained = ff.Glow(2, 2, 2, filter_size=8, reversible=True)
    x = torch.randn(2, 2, 8, 8)
    trained(x)
    state = _roundtrip(trained.state_dict())
    with torch.device("meta"):
        model = ff.Glow(2, 2, 2, filter_size=8, reversible=True)
    model.to_empty(device="cpu")
    for block in model.blocks:  # what the fresh memory may hold
        block.flows.fallback_count.fill_(7)
        block.flows.fallback_overflow.fill_(7)
    model.load_state_dict(state)
    assert int(model.fallback_count) == 0 and int(model.fallback_overflow) == 0
    got, want = model(x), trained(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    model.blocks[1].flows.fallback_count.fill_(3)
    model.load_state_dict({k: v for k, v in state.items() if k.startswith("blocks.0.")},
                          strict=False)
    assert int(model.blocks[1].flows.fallback_count) == 3


def test_copies_made_after_an_in_place_write(backend):
    """A copy (deepcopy, pickling) made after an in-place write to a mirrored buffer and
    before the next call: the copy's tensors have versions of their own, which could match
    the recorded one, so the copy kept the stale mirror: a loaded InvConv2dLU with another
    layer's state copied in tensor by tensor assembled W with the old permutation (max
    error 3.8), and a copy of an ActNorm whose flag was reset did not initialise again."""
    torch.manual_seed(0)
    layer, other = ff.InvConv2dLU(4).to(DEVICE), ff.InvConv2dLU(4).to(DEVICE)
    layer.load_state_dict(ff.InvConv2dLU(4).state_dict())
    with torch.no_grad():
        for k, v in layer.state_dict().items():
            v.copy_(other.state_dict()[k])
    an = ff.ActNorm(3)
    an(torch.randn(4, 3, 2, 2))
    an.initialized.zero_()
    buf = io.BytesIO()
    torch.save((layer, an), buf)
    buf.seek(0)
    copies = [copy.deepcopy((layer, an)), torch.load(buf, weights_only=False)]
    x, xa = torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(4, 3, 2, 2) + 5
    want = ff.ActNorm(3)(xa)  # a layer that initialises from xa
    for twin, an_twin in copies:
        torch.testing.assert_close(twin(x), other(x), rtol=0, atol=0)
        torch.testing.assert_close(an_twin(xa), want, rtol=0, atol=0)
