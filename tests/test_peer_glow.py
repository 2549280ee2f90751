"""The benchmark's peer (benchmarks/peer_glow.py, rosinality's structure in plain PyTorch)
loaded with fastflow's weights is the same model as fastflow's Glow: same log_p + logdet
and the same sample from the same z, in float64."""

import sys
from pathlib import Path

import pytest
import torch

import fastflow as ff

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peer_glow  # noqa: E402


@pytest.mark.parametrize("n_flow,n_block,size", [(2, 1, 4), (2, 3, 16)])
def test_peer_with_fastflow_weights_matches_fastflow(n_flow, n_block, size):
    torch.manual_seed(0)
    ours = ff.Glow(3, n_flow=n_flow, n_block=n_block, filter_size=8).double()
    x = torch.rand(8, 3, size, size, dtype=torch.float64) - 0.5
    with torch.no_grad():
        ours(x)  # ActNorm's data-dependent initialisation
        for name, p in ours.named_parameters():  # off the zero initialisation, so every
            # term counts; the priors only a little, or sampling overflows
            p.add_((0.002 if ".prior." in f".{name}" else 0.05) * torch.randn_like(p))
    peer = peer_glow.Glow(3, n_flow=n_flow, n_block=n_block, filter_size=8).double()
    missing = peer.load_state_dict(ours.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    assert all(b.actnorm._init for blk in peer.blocks for b in blk.flows)

    x = torch.rand(4, 3, size, size, dtype=torch.float64) - 0.5
    log_p, logdet, z = ours(x)
    log_p2, logdet2, z2 = peer(x)
    torch.testing.assert_close(log_p + logdet, log_p2 + logdet2, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(logdet, logdet2, rtol=1e-10, atol=1e-9)
    for a, b in zip(z, z2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    eps = [0.7 * torch.randn(4, *s, dtype=torch.float64) for s in ours.z_shapes(size, size)]
    with torch.no_grad():
        sample = ours.reverse(eps)
        assert torch.isfinite(sample).all()
        torch.testing.assert_close(sample, peer.reverse(eps), rtol=1e-9, atol=1e-9)
        # reconstruction: z from the forward maps back to x in both
        torch.testing.assert_close(peer.reverse(z2, reconstruct=True), x, rtol=1e-9, atol=1e-9)


def test_floor_runs_the_networks_and_priors_only():
    torch.manual_seed(0)
    peer = peer_glow.Glow(3, n_flow=2, n_block=2, filter_size=8)
    floor = peer_glow.FloorGlow(peer)
    x = torch.rand(2, 3, 8, 8) - 0.5
    log_p, logdet, _ = floor(x)
    (log_p + logdet).sum().backward()
    nets = [p for blk in peer.blocks for f in blk.flows for p in f.coupling.net.parameters()]
    priors = [p for blk in peer.blocks for p in blk.prior.parameters()]
    flow_layers = [p for blk in peer.blocks for f in blk.flows
                   for m in (f.actnorm, f.invconv) for p in m.parameters()]
    assert all(p.grad is not None for p in nets + priors)
    assert all(p.grad is None for p in flow_layers)


def test_peer_actnorm_initialises_on_its_first_forward_in_eval_mode_too():
    """rosinality's ActNorm initialises on its first forward whatever the mode (it reads its
    ``initialized`` buffer, not ``self.training``); so must the peer that stands for it."""
    torch.manual_seed(0)
    peer = peer_glow.Glow(3, n_flow=1, n_block=1, filter_size=8).double().eval()
    x = torch.rand(4, 3, 4, 4, dtype=torch.float64) - 0.5
    with torch.no_grad():
        peer(x)
    an = peer.blocks[0].flows[0].actnorm
    flat = peer_glow.squeeze(x).transpose(0, 1).reshape(12, -1)
    assert an.initialized.item() == 1
    torch.testing.assert_close(an.loc.flatten(), -flat.mean(1))
    torch.testing.assert_close(an.scale.flatten(), 1 / (flat.std(1) + 1e-6))
    before = an.loc.detach().clone()
    peer.train()
    with torch.no_grad():
        peer(x + 1)  # once only
    torch.testing.assert_close(an.loc.detach(), before)
