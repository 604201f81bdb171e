"""The EqM objective: c(gamma), the target, the loss, and explicit-energy training gradients."""

import pytest
import torch

from eqm.errors import EqmError
from eqm.config import EqMConfig
from eqm.model import EqMTransformer
from eqm.objective import c_gamma, eqm_loss, eqm_target, interpolate
from eqm.timebase import uniform_timestamps


def test_c_gamma_is_the_truncated_decay():
    g = torch.tensor([0.0, 0.3, 0.8, 0.9, 0.95, 1.0])
    torch.testing.assert_close(c_gamma(g), torch.tensor([4.0, 4.0, 4.0, 2.0, 1.0, 0.0]))
    torch.testing.assert_close(c_gamma(g, a=0.5, lam=2.0), torch.tensor([2.0, 2.0, 0.8, 0.4, 0.2, 0.0]))
    with pytest.raises(EqmError):
        c_gamma(g, a=1.0)


class Probe(torch.nn.Module):
    """A stand-in model that records its input and returns a fixed function of it."""

    def forward(self, x, timestamps, y, pos=None):
        self.seen = (x, timestamps, y)
        return torch.sin(3 * x) + 0.5


def test_loss_matches_the_formula_element_by_element():
    x1 = torch.randn(4, 3, 2, 4, 4)
    x0 = torch.randn_like(x1)
    gamma = torch.tensor([0.0, 0.5, 0.85, 1.0])
    ts = uniform_timestamps(2, 24).expand(4, -1)
    model = Probe()
    loss, stats = eqm_loss(model, x1, ts, None, gamma=gamma, noise=x0)
    # written out per sample, scalar by scalar: c = 4 * min(1, (1 - g) / 0.2)
    total, count = 0.0, 0
    for b, g in enumerate(gamma.tolist()):
        xg = g * x1[b] + (1 - g) * x0[b]
        assert torch.allclose(model.seen[0][b], xg, atol=1e-6)
        c = 4.0 * min(1.0, (1.0 - g) / 0.2)
        target = (x1[b] - x0[b]) * c
        total += float(((torch.sin(3 * xg) + 0.5 - target) ** 2).sum())
        count += xg.numel()
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
    assert model.seen[1] is ts  # timestamps passed through untouched
    assert float(stats["loss"]) == pytest.approx(float(loss))
    torch.testing.assert_close(eqm_target(x0, x1, gamma)[3], torch.zeros_like(x1[3]))  # gamma = 1: no force
    torch.testing.assert_close(interpolate(x0, x1, gamma)[0], x0[0])


def test_gamma_and_noise_come_from_the_generator_per_sample():
    x1 = torch.zeros(64, 1, 1, 2, 2)
    model = Probe()
    _, stats_a = eqm_loss(model, x1, None, None, generator=torch.Generator().manual_seed(5))
    xa = model.seen[0].clone()
    _, stats_b = eqm_loss(model, x1, None, None, generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.seen[0], xa)  # reproducible from the generator
    g = torch.Generator().manual_seed(5)
    gamma = torch.rand(64, generator=g)
    noise = torch.randn(x1.shape, generator=g)
    torch.testing.assert_close(xa, (1 - gamma).view(-1, 1, 1, 1, 1) * noise)
    assert gamma.std() > 0.2  # one gamma per sample, spread over [0, 1]


@pytest.mark.parametrize("energy", ["dot", "l2"])
def test_energy_training_gradient_is_exact(energy):
    """Backprop through grad_x E (create_graph) agrees with finite differences of the loss."""
    torch.manual_seed(0)
    model = EqMTransformer(EqMConfig(input_size=4, in_channels=2, num_frames=2, patch_size=2, hidden_size=16, depth=1,
                           num_heads=2, num_classes=0, energy=energy)).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    x1 = torch.randn(2, 2, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x1)
    gamma = torch.tensor([0.3, 0.9], dtype=torch.float64)
    ts = uniform_timestamps(2, 12, dtype=torch.float64).expand(2, -1)

    def loss_fn():
        return eqm_loss(model, x1, ts, None, gamma=gamma, noise=noise)[0]

    model.zero_grad()
    loss_fn().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    direction = [torch.randn_like(p) for p in params]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
    up = float(loss_fn().detach())
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
    down = float(loss_fn().detach())
    numeric = (up - down) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert abs(analytic) > 1e-3  # a real gradient, not a vacuous zero


def test_energy_training_runs_in_float32_where_fused_attention_lacks_double_backward():
    """float32 on CPU would pick the flash SDPA kernel, which has no double backward; the model
    must switch to the math kernel when it differentiates through grad_x E."""
    torch.manual_seed(0)
    model = EqMTransformer(EqMConfig(input_size=8, in_channels=3, num_frames=2, patch_size=2, hidden_size=32, depth=1,
                           num_heads=2, num_classes=0, energy="dot"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    loss, _ = eqm_loss(model, torch.randn(2, 3, 2, 8, 8), None, None)
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
