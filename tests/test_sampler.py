"""Samplers: GD / NAG-GD math, adaptive stopping, CFG, clamped frames, and a real learning signal."""

import pytest
from types import SimpleNamespace

import torch

from eqm.embed import Positions
from eqm.errors import EqmError, ParamError
from eqm.config import PAPER_SETTINGS, EqMConfig, SamplerSettings
from eqm.model import EqMTransformer
from eqm.objective import eqm_loss
from eqm.sampler import sample
from eqm.timebase import uniform_timestamps


class AnchorField(torch.nn.Module):
    """f(x) = anchor(y) - x: an exactly known gradient field (anchor per label, per channel).

    Records every call so tests can check batching and how often positions are built.
    """

    def __init__(self, anchors):  # anchors: (num_classes + 1, C), last row = null label
        super().__init__()
        self.register_buffer("anchors", anchors)
        self.config = SimpleNamespace(num_classes=anchors.shape[0] - 1)  # what the sampler reads of a model's config
        self.calls, self.position_calls = [], 0

    def positions(self, timestamps=None, num_frames=None):
        self.position_calls += 1
        return Positions(add=None, rope=None, fps=None, num_frames=num_frames, num_tokens=0)

    def forward(self, x, timestamps, y, *, pos=None):
        assert pos is not None  # the sampler always hands over precomputed positions
        self.calls.append((x.shape[0], None if y is None else y.clone()))
        y = torch.full((x.shape[0],), self.config.num_classes) if y is None else y
        a = self.anchors[y].reshape(x.shape[0], -1, *([1] * (x.ndim - 2)))
        return a - x


def field(C=3, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return AnchorField(torch.randn(K + 1, C, generator=g))


def test_gd_follows_the_update_rule_exactly():
    model = field()
    x0 = torch.randn(2, 3, 4, 2, 2)
    out = sample(model, x0, None, settings=SamplerSettings(method="gd", steps=7, step_size=0.1))
    a = model.anchors[-1].view(1, 3, 1, 1, 1)
    torch.testing.assert_close(out.x, a + 0.9**7 * (x0 - a))
    assert out.evals.tolist() == [7, 7] and out.steps == 7
    assert model.position_calls == 1 and len(model.calls) == 7


def test_nag_follows_the_update_rule_exactly():
    model = field()
    x0 = torch.randn(2, 3, 4, 2, 2)
    eta, mu = 0.05, 0.3
    out = sample(model, x0, None, settings=SamplerSettings(method="nag", steps=9, step_size=eta, momentum=mu))
    a = model.anchors[-1].view(1, 3, 1, 1, 1)
    x, m = x0.clone(), torch.zeros_like(x0)
    for _ in range(9):
        m = a - (x + eta * mu * m)
        x = x + eta * m
    torch.testing.assert_close(out.x, x)


def test_adaptive_stop_counts_evaluations_per_sample():
    model = field()
    a = model.anchors[-1].view(1, 3, 1, 1, 1)
    x0 = a + torch.stack([torch.ones(3, 1, 2, 2), 10 * torch.ones(3, 1, 2, 2)])  # RMS distance 1 and 10
    out = sample(model, x0, None, settings=SamplerSettings(method="gd", steps=100, step_size=0.1, tol=0.5))
    # RMS after n steps is d * 0.9^n; a sample stops at the first evaluation below 0.5
    assert out.evals.tolist() == [8, 30]  # 0.9^7 = 0.478, 10 * 0.9^29 = 0.471
    assert out.steps == 30  # the loop ends as soon as every sample has stopped
    torch.testing.assert_close(out.x[0], (a + 0.9**7 * (x0 - a))[0])  # it stopped moving there
    torch.testing.assert_close(out.final_rms, torch.tensor([0.9**7, 10 * 0.9**29]))
    # Only samples still moving go through the model: real compute saved.
    assert [n for n, _ in model.calls] == [2] * 8 + [1] * 22


def test_cfg_guides_all_channels_with_one_batched_pass():
    model = field(C=5, K=3)
    x0 = torch.randn(2, 5, 2, 2, 2)
    y = torch.tensor([2, 0])
    out = sample(model, x0, None, y, settings=SamplerSettings(method="gd", steps=1, step_size=0.5, cfg_scale=3.0))
    c = model.anchors[y].view(2, 5, 1, 1, 1)
    u = model.anchors[-1].view(1, 5, 1, 1, 1)
    f = (u - x0) + 3.0 * ((c - x0) - (u - x0))  # f_u + s (f_c - f_u), every one of the 5 channels
    torch.testing.assert_close(out.x, x0 + 0.5 * f)
    (n, labels), = model.calls
    assert n == 4 and labels.tolist() == [2, 0, 3, 3]  # cond and null labels in one batch
    with pytest.raises(EqmError):
        sample(model, x0, None, None, settings=SamplerSettings(steps=1, cfg_scale=2.0))


def test_cfg_every_reuses_the_last_guidance_term_with_one_pass():
    model = field(C=2, K=2)
    x0 = torch.randn(2, 2, 3, 2, 2)
    y = torch.tensor([1, 0])
    eta, s = 0.1, 2.5
    out = sample(model, x0, None, y, settings=SamplerSettings(method="gd", steps=5, step_size=eta, cfg_scale=s, cfg_every=2))
    c = model.anchors[y].view(2, 2, 1, 1, 1)
    u = model.anchors[-1].view(1, 2, 1, 1, 1)
    x = x0.clone()
    for k in range(5):
        if k % 2 == 0:
            guide = (c - x) - (u - x)  # f_c - f_u, measured on this step
        x = x + eta * ((c - x) + (s - 1) * guide)
    torch.testing.assert_close(out.x, x)
    # the null-label pass runs on steps 0, 2 and 4 only: batches of 4, 2, 4, 2, 4
    assert [n for n, _ in model.calls] == [4, 2, 4, 2, 4]
    assert out.evals.tolist() == [5, 5]
    with pytest.raises(EqmError, match="cfg_every"):
        sample(model, x0, None, y, settings=SamplerSettings(steps=1, cfg_scale=2.0, cfg_every=0))


def test_cfg_every_one_is_the_full_guidance():
    model = field(C=2, K=2)
    x0 = torch.randn(3, 2, 2, 2, 2)
    y = torch.tensor([1, 0, 1])
    a = sample(model, x0, None, y, settings=SamplerSettings(steps=4, step_size=0.1, cfg_scale=2.0)).x
    b = sample(model, x0, None, y, settings=SamplerSettings(steps=4, step_size=0.1, cfg_scale=2.0, cfg_every=1)).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["gd", "nag"])
def test_clamped_frames_stay_exactly_at_their_data(method):
    model = field()
    B, C, T = 2, 3, 5
    known = torch.randn(B, C, T, 4, 4)
    mask = torch.tensor([[True, False, False, False, True], [True, True, False, False, False]])
    seen = []

    def check(step, x, rms, active):
        seen.append(step)
        m = mask[:, None, :, None, None].expand_as(x)
        assert torch.equal(x[m], known[m])

    noise = torch.randn(B, C, T, 4, 4)
    out = sample(model, noise, uniform_timestamps(T, 24),
                 known=known, known_mask=mask, callback=check, settings=SamplerSettings(method=method, steps=20, step_size=0.1))
    assert seen == list(range(20)) and out.evals.tolist() == [20, 20]
    m = mask[:, None, :, None, None].expand_as(out.x)
    assert torch.equal(out.x[m], known[m])
    a = model.anchors[-1].view(1, 3, 1, 1, 1).expand_as(out.x)
    assert (out.x[~m] - a[~m]).abs().max() < (noise[~m] - a[~m]).abs().max()  # unknown frames moved
    # a sample whose frames are all known has nothing to move: zero gradient, stops at once
    full = sample(model, noise, None, known=known,
                  known_mask=torch.tensor([[True] * T, [False] * T]), settings=SamplerSettings(steps=20, step_size=0.1, tol=1e-6))
    assert full.evals.tolist()[0] == 1 and full.final_rms[0] == 0


def test_bad_conditioning_inputs_raise():
    model = field()
    with pytest.raises(EqmError):
        sample(model, (2, 3, 4, 2, 2), None, known=torch.zeros(2, 3, 4, 2, 2), settings=SamplerSettings(steps=2))
    with pytest.raises(EqmError):
        sample(model, (2, 3, 4, 2, 2), uniform_timestamps(3, 24), settings=SamplerSettings(steps=2))


def test_default_settings_are_the_measured_small_model_ones():
    """A field not chosen stays None until resolved, from one table per method: the measured
    small-model defaults, or the paper's for official checkpoints; guidance not chosen is 1."""
    gd, nag = SamplerSettings("gd").resolved(), SamplerSettings("nag").resolved()
    assert (gd.steps, gd.step_size, gd.momentum, gd.tol, gd.cfg_scale) == (40, 0.03, 0.0, 0.01, 1.0)
    assert (nag.steps, nag.step_size, nag.momentum) == (30, 0.02, 0.3)
    assert SamplerSettings("nag", steps=5).resolved() == SamplerSettings("nag", steps=5, step_size=0.02, momentum=0.3,
                                                                         tol=0.01, cfg_scale=1.0, cfg_every=1)
    paper = SamplerSettings("nag", tol=0.5).resolved(PAPER_SETTINGS)
    assert (paper.steps, paper.step_size, paper.momentum, paper.tol) == (250, 0.0017, 0.3, 0.5)
    assert SamplerSettings(tol=0).stop_tol is None and gd.stop_tol == 0.01
    assert SamplerSettings().guidance == 1.0 and SamplerSettings().with_default_guidance(2.0).guidance == 2.0
    assert SamplerSettings(cfg_scale=1.5).with_default_guidance(2.0).guidance == 1.5


@pytest.mark.parametrize("kw,msg", [
    (dict(method="adam"), "method must be one of gd, nag, got 'adam'"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(steps=2.5), "steps must be an integer >= 1"),
    (dict(step_size=0), "step_size must be > 0"),
    (dict(step_size=float("nan")), "step_size must be a finite number"),
    (dict(momentum=1.0), "momentum must be in [0, 1)"),
    (dict(tol=-1), "tol must be >= 0"),
    (dict(cfg_scale=-0.5), "cfg_scale must be >= 0"),
    (dict(guidance_channels=0), "guidance_channels must be an integer >= 1"),
])
def test_settings_errors_name_the_field(kw, msg):
    with pytest.raises(ParamError) as e:
        SamplerSettings(**kw)
    assert msg in str(e.value) and e.value.param == next(iter(kw))


# ----------------------------------------------------------------------------- a real learned model

def toy_clips():
    """Four fixed 3x4x8x8 clips in [-0.8, 0.8]: the toy data distribution."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 4, 8, 8, generator=g) * 1.6 - 0.8


def nearest_rms(x, data):
    return (x[:, None] - data[None]).pow(2).flatten(2).mean(-1).sqrt().min(1).values


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained 400 EqM steps on the toy clips (~3 s on two cores)."""
    torch.manual_seed(0)
    data = toy_clips()
    model = EqMTransformer(EqMConfig(input_size=8, in_channels=3, num_frames=4, patch_size=4, hidden_size=64, depth=2,
                           num_heads=4, num_classes=0, class_dropout_prob=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ts = uniform_timestamps(4, 24).expand(32, -1)
    for _ in range(400):
        idx = torch.randint(0, len(data), (32,), generator=g)
        loss, _ = eqm_loss(model, data[idx], ts, None, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, data


@pytest.mark.parametrize("method", ["gd", "nag"])
def test_trained_model_samples_are_closer_to_the_data_than_noise(trained, method):
    model, data = trained
    noise = torch.randn(32, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = sample(model, noise, uniform_timestamps(4, 24), settings=SamplerSettings(method=method))  # measured defaults
    d_noise = float(nearest_rms(noise, data).mean())
    d_sample = float(nearest_rms(out.x, data).mean())
    assert d_sample < 0.6 * d_noise, (d_sample, d_noise)


def test_adaptive_stop_saves_evaluations_on_the_trained_model(trained):
    model, data = trained
    noise = torch.randn(32, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ts = uniform_timestamps(4, 24)
    fixed = sample(model, noise, ts, settings=SamplerSettings(steps=80, step_size=0.03))
    adaptive = sample(model, noise, ts, settings=SamplerSettings(steps=80, step_size=0.03, tol=0.3))
    assert adaptive.evals.float().mean() < 0.75 * 80
    assert adaptive.evals.min() < adaptive.evals.max() or adaptive.evals.max() < 80  # per-sample counts
    assert (adaptive.final_rms[adaptive.evals < 80] < 0.3).all()
    # stopping early costs little quality
    assert float(nearest_rms(adaptive.x, data).mean()) < float(nearest_rms(fixed.x, data).mean()) + 0.1


def test_positions_are_built_once_per_sampling_run(trained):
    model, _ = trained
    calls = []
    original = model.positions

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    model.positions = counting
    try:
        sample(model, (3, 3, 4, 8, 8), uniform_timestamps(4, 30),
               generator=torch.Generator().manual_seed(0), settings=SamplerSettings(method="nag", steps=6, tol=1e-9))
    finally:
        del model.positions
    assert len(calls) == 1


def test_energy_model_samples_under_no_grad():
    torch.manual_seed(0)
    model = EqMTransformer(EqMConfig(input_size=8, in_channels=3, num_frames=2, patch_size=4, hidden_size=32, depth=1,
                           num_heads=2, num_classes=2, energy="l2"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
        model.train()
        out = sample(model, (2, 3, 2, 8, 8), uniform_timestamps(2, 24), torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0), settings=SamplerSettings(steps=3, cfg_scale=2.0))
    assert model.training  # the sampler restores the caller's mode
    assert out.evals.tolist() == [3, 3] and torch.isfinite(out.x).all() and not out.x.requires_grad
