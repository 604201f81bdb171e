"""The EqM transformer: official image-checkpoint compatibility and time-aware behaviour."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eqm.errors import EqmError, ParamError
from eqm.config import EQM_SIZES, LEGACY_DEFAULTS, EqMConfig
from eqm.model import EqMTransformer
from eqm.timebase import uniform_timestamps


def randomize(model, std=0.1, seed=0):
    """Give every trainable weight a random value (adaLN-Zero would otherwise make f == 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def small(**kw):
    cfg = dict(input_size=8, in_channels=3, num_frames=4, patch_size=4, hidden_size=32, depth=2,
               num_heads=2, num_classes=3)
    cfg.update(kw)
    return randomize(EqMTransformer(EqMConfig(**cfg))).eval()


# ----------------------------------------------------------------------------- official checkpoints

def official_state_dict(depth, D, C, p, grid, num_classes, learn_sigma=True, seed=0):
    """Key names and shape formulas of the official EqM/SiT/DiT image checkpoints, written out by hand."""
    out_c = 2 * C if learn_sigma else C
    shapes = {
        "pos_embed": (1, grid * grid, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),
        "final_layer.linear.weight": (p * p * out_c, D),
        "final_layer.linear.bias": (p * p * out_c,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    sd["pos_embed"] = torch.from_numpy(dit_pos_embed(D, grid)).float()[None]
    return sd


def dit_pos_embed(D, grid):
    """DiT get_2d_sincos_pos_embed: meshgrid(w, h), column code first, [sin | cos] per axis."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(D // 2, gw), one_d(D // 2, gh)], axis=1)


def reference_image_forward(sd, x, y, depth, heads, p, C):
    """The official image model's forward, written functionally from the state dict."""
    N, _, H, W = x.shape
    D = sd["pos_embed"].shape[-1]
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.zeros(N)[:, None] * freqs[None]  # t = 0 always
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    L, hd = tok.shape[1], D // heads
    for i in range(depth):
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"],
                                              sd[b + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        h = F.layer_norm(tok, (D,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(N, L, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(N, L, D), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        tok = tok + g1[:, None] * att
        h = F.layer_norm(tok, (D,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        tok = tok + g2[:, None] * h
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = F.layer_norm(tok, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    out = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    g = H // p
    out = out.reshape(N, g, g, p, p, 2 * C)
    out = torch.einsum("nhwpqc->nchpwq", out).reshape(N, 2 * C, H, W)
    return out[:, :C]  # learn_sigma: the second half is discarded


def test_official_image_checkpoint_loads_strict_and_keeps_its_meaning():
    depth, D, heads, C, p, size, K = 2, 64, 4, 4, 2, 8, 10
    sd = official_state_dict(depth, D, C, p, size // p, K)
    model = EqMTransformer(EqMConfig(input_size=size, in_channels=C, patch_size=p, hidden_size=D, depth=depth,
                           num_heads=heads, num_classes=K, class_dropout_prob=0.1, learn_sigma=True))
    # Our own freshly built table equals DiT's before anything is loaded.
    torch.testing.assert_close(model.pos_embed.data, sd["pos_embed"], atol=2e-6, rtol=0)
    model.load_state_dict(sd, strict=True)
    model.eval()
    x = torch.randn(3, C, size, size)
    y = torch.tensor([0, 7, K])  # K = the null class
    with torch.no_grad():
        got = model(x, None, y)
        ref = reference_image_forward(sd, x, y, depth, heads, p, C)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        # The video path at T = 1 is the image model, whatever the frame's timestamp.
        vid = model(x.unsqueeze(2), torch.tensor([[0.0], [1.5], [9.0]]), y)
        torch.testing.assert_close(vid[:, :, 0], got, atol=1e-5, rtol=1e-5)


def test_official_checkpoint_refuses_models_it_does_not_fit():
    sd = official_state_dict(1, 32, 4, 2, 4, 5)
    common = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                  num_classes=5, learn_sigma=True)
    for extra in (dict(pos="rope"), dict(time_mode="fps-embed"), dict(temporal_patch=2, num_frames=2)):
        with pytest.raises(RuntimeError):
            EqMTransformer(EqMConfig(**common, **extra)).load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------- time awareness

def clip_batch(rates, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(rates), 3, T, 8, 8, generator=g)
    ts = torch.stack([uniform_timestamps(T, r) for r in rates])
    return x, ts


@pytest.mark.parametrize("pos", ["sincos", "rope"])
@pytest.mark.parametrize("mode", ["seconds", "index", "fps-embed"])
def test_timestamps_matter_exactly_as_the_mode_says(pos, mode):
    model = small(pos=pos, time_mode=mode)
    x, _ = clip_batch([24])
    with torch.no_grad():
        at24 = model(x, uniform_timestamps(4, 24)[None])
        at60 = model(x, uniform_timestamps(4, 60)[None])
        shifted = model(x, uniform_timestamps(4, 24)[None] + 3.0)  # same rate, clip starts later
    if mode == "index":  # the time-blind baseline ignores timestamps
        torch.testing.assert_close(at24, at60)
    else:
        assert (at24 - at60).abs().max() > 1e-3
    torch.testing.assert_close(at24, shifted, atol=1e-5, rtol=1e-5)  # positions are clip-relative


@pytest.mark.parametrize("attention", ["full", "divided"])
@pytest.mark.parametrize("pos", ["sincos", "rope"])
def test_permuting_frames_changes_the_output(pos, attention):
    model = small(pos=pos, attention=attention)
    x, ts = clip_batch([30])
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = model(x, ts)
        # Same timestamps, frames shuffled: a time-aware model is not permutation-equivariant.
        shuffled = model(x[:, :, perm], ts)
        assert (shuffled - out[:, :, perm]).abs().max() > 1e-3
        # Shuffle frames together with their timestamps: the same tokens, just listed differently.
        both = model(x[:, :, perm], ts[:, perm])
        torch.testing.assert_close(both, out[:, :, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["full", "divided"])
@pytest.mark.parametrize("pos", ["sincos", "rope"])
@pytest.mark.parametrize("mode", ["seconds", "fps-embed"])
def test_mixed_rate_batch_equals_each_sample_alone(pos, mode, attention):
    model = small(pos=pos, time_mode=mode, attention=attention)
    rates = [8, 60, 30000 / 1001]
    x, ts = clip_batch(rates)
    y = torch.tensor([0, 2, 1])
    with torch.no_grad():
        batch = model(x, ts, y)
        for i in range(len(rates)):
            alone = model(x[i:i + 1], ts[i:i + 1], y[i:i + 1])
            torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- divided attention

def test_token_views_per_frame_and_per_position_round_trip():
    from eqm.model import frames_view, from_tracks, tracks_view

    B, T, hw, D = 2, 3, 4, 5
    x = torch.randn(B, T * hw, D)
    grid = x.reshape(B, T, hw, D)
    torch.testing.assert_close(frames_view(x, hw), grid.reshape(B * T, hw, D), rtol=0, atol=0)
    tracks = tracks_view(x, hw)  # sequence b*hw + j is patch j of clip b across its frames
    torch.testing.assert_close(tracks[1 * hw + 2], grid[1, :, 2], rtol=0, atol=0)
    torch.testing.assert_close(from_tracks(tracks, B), x, rtol=0, atol=0)


@pytest.mark.parametrize("pos", ["sincos", "rope"])
def test_divided_model_starts_as_the_full_model_on_each_frame(pos):
    full = small(pos=pos)
    divided = EqMTransformer(EqMConfig(**{**full.config.to_dict(), "attention": "divided"})).eval()
    missing = divided.load_state_dict(full.state_dict(), strict=False).missing_keys
    assert missing and all(".temporal_attn." in k for k in missing)
    x, ts = clip_batch([24, 60])
    y = torch.tensor([0, 2])
    with torch.no_grad():
        # a new divided block adds nothing across frames: changing frame 3 leaves frames 0-2 alone,
        # and a single frame is exactly the full (image) model's output
        moved = x.clone()
        moved[:, :, 3] += 1.0
        torch.testing.assert_close(divided(moved, ts, y)[:, :, :3], divided(x, ts, y)[:, :, :3], atol=1e-6, rtol=0)
        torch.testing.assert_close(divided(x[:, :, :1], ts[:, :1], y), full(x[:, :, :1], ts[:, :1], y),
                                   atol=1e-6, rtol=0)
        randomize(divided)  # trained attention across frames: frame 0 now sees frame 3
        assert (divided(moved, ts, y)[:, :, 0] - divided(x, ts, y)[:, :, 0]).abs().max() > 1e-3


def test_bf16_autocast_on_the_cpu_stays_close_to_fp32_and_trains():
    model = small(attention="divided", pos="rope").train()
    x, ts = clip_batch([24, 30])
    with torch.no_grad():
        ref = model.eval()(x, ts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, ts)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, ts).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_precomputed_positions_give_the_same_output():
    model = small(pos="rope", time_mode="fps-embed")
    x, ts = clip_batch([12, 48])
    with torch.no_grad():
        pos = model.positions(ts)
        torch.testing.assert_close(model(x, ts, pos=pos), model(x, ts))
        with pytest.raises(EqmError):
            model(x[:, :, :2], None, pos=pos)  # positions of another clip length


def test_sincos_positions_match_the_per_token_code():
    from eqm import embed as E
    model = small(hidden_size=64, num_heads=4, temporal_patch=2)
    ts = torch.stack([uniform_timestamps(4, 10), uniform_timestamps(4, 50)])
    pos = model.positions(ts)
    tau = E.temporal_coords(ts, 4, time_mode="seconds", ref_fps=model.config.ref_fps, temporal_patch=2)
    ref = E.sincos_3d(E.token_coords(tau, *model.config.grid), 64, model.config.time_frac)
    torch.testing.assert_close(pos.add, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pt", [1, 2])
def test_patch_embedding_and_unpatchify_agree_on_token_layout(pt):
    """With no blocks every token maps to its own patch: a change inside one (frames x rows x
    cols) patch may only change the output inside that same patch."""
    model = small(depth=0, temporal_patch=pt, patch_size=2)
    x, ts = clip_batch([24])
    x2 = x.clone()
    x2[0, :, pt, 2, 5] += 1.0  # a pixel of temporal patch 1, row patch 1, col patch 2
    with torch.no_grad():
        diff = (model(x2, ts) - model(x, ts)).abs().sum(1)[0]  # (T, H, W)
    changed = diff > 1e-6
    expected = torch.zeros_like(changed)
    expected[pt:2 * pt, 2:4, 4:6] = True
    assert torch.equal(changed, expected)


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("size", list(EQM_SIZES))
@pytest.mark.parametrize("pos", ["sincos", "rope"])
def test_every_size_builds_and_runs(size, pos):
    model = EqMTransformer(EqMConfig.from_size(size, input_size=4, num_frames=2, patch_size=2, depth=1, pos=pos, num_classes=2))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 2, 4, 4), uniform_timestamps(2, 24)[None])
    assert out.shape == (1, 3, 2, 4, 4)


def test_invalid_configurations_raise_eqm_errors():
    with pytest.raises(EqmError):
        EqMConfig.from_size("huge")
    with pytest.raises(EqmError):
        EqMTransformer(EqMConfig(hidden_size=30, num_heads=4))
    with pytest.raises(EqmError):
        EqMTransformer(EqMConfig(hidden_size=60, num_heads=4, pos="rope"))  # head_dim 15 is odd
    with pytest.raises(EqmError):
        EqMTransformer(EqMConfig(input_size=9, patch_size=2))
    with pytest.raises(EqmError):
        EqMTransformer(EqMConfig(time_mode="frames"))
    with pytest.raises(EqmError):
        EqMTransformer(EqMConfig(ref_fps=0))
    with pytest.raises(EqmError):
        small()(torch.randn(1, 3, 4, 16, 16))  # wrong spatial size


def test_config_errors_name_the_field_in_library_terms():
    cases = [
        (dict(hidden_size=30, num_heads=4), "hidden_size must be divisible by num_heads (4), got 30"),
        (dict(input_size=9), "input_size must be divisible by patch_size (2), got (9, 9)"),
        (dict(num_frames=5, temporal_patch=2), "num_frames must be a multiple of temporal_patch (2), got 5"),
        (dict(time_mode="frames"), "time_mode must be one of seconds, index, fps-embed, got 'frames'"),
        (dict(ref_fps=float("inf")), "ref_fps must be a finite number"),
        (dict(time_frac=0.7), "time_frac for sincos must be in [0, 0.5], got 0.7"),
        (dict(depth=True), "depth must be an integer >= 0, got True"),
        (dict(energy="none"), "energy must be None, 'dot' or 'l2'"),
    ]
    for kw, msg in cases:
        with pytest.raises(ParamError) as e:
            EqMConfig(**kw)
        assert msg in str(e.value) and str(e.value).startswith(e.value.param), (kw, str(e.value))
    with pytest.raises(EqmError, match="did you mean 'S'"):
        EqMConfig.from_size("s")
    with pytest.raises(dataclasses.FrozenInstanceError):
        EqMConfig().depth = 3
    assert dataclasses.replace(EqMConfig(), input_size=(8, 16), patch_size=8).grid == (1, 2)


def test_from_dict_applies_legacy_defaults_and_rejects_unknown_keys():
    arch = EqMConfig(input_size=8, hidden_size=32, num_heads=2, time_order="paired").to_dict()
    assert EqMConfig.from_dict(arch).time_order == "paired"
    del arch["time_order"]  # written before the key existed: the layout there was then
    assert EqMConfig.from_dict(arch).time_order == LEGACY_DEFAULTS["time_order"] == "aligned"
    with pytest.raises(EqmError, match=r"^state.json: model option 'hiden_size' is not understood.*did you mean 'hidden_size'"):
        EqMConfig.from_dict({**arch, "hiden_size": 3}, "state.json")
    with pytest.raises(EqmError, match=r"^state.json: hidden_size must be divisible"):
        EqMConfig.from_dict({**arch, "hidden_size": 33}, "state.json")
    with pytest.raises(EqmError, match="must be a mapping"):
        EqMConfig.from_dict([1, 2], "state.json")
    with pytest.raises(TypeError, match="EqMConfig"):
        EqMTransformer(arch)


def test_config_round_trips_through_json():
    model = small(pos="rope", time_mode="fps-embed", temporal_patch=2, energy="dot", ref_fps=30.0)
    cfg = EqMConfig.from_dict(json.loads(json.dumps(model.config.to_dict())))
    assert cfg == model.config
    clone = EqMTransformer(cfg)
    clone.load_state_dict(model.state_dict(), strict=True)
    clone.eval()
    x, ts = clip_batch([15])
    torch.testing.assert_close(clone(x, ts), model(x, ts))


def test_null_label_and_label_dropout():
    model = small(class_dropout_prob=1.0)
    x, ts = clip_batch([24, 24])
    with torch.no_grad():
        null = model(x, ts, None)
        cond = model(x, ts, torch.tensor([0, 1]))
        model.train()  # dropout p = 1: every label becomes the null label
        dropped = model(x, ts, torch.tensor([0, 1]))
    assert (cond - null).abs().max() > 1e-3
    torch.testing.assert_close(dropped, null)
    assert model.y_embedder.embedding_table.num_embeddings == 4  # 3 classes + null


# ----------------------------------------------------------------------------- explicit energy

@pytest.mark.parametrize("energy", ["dot", "l2"])
def test_energy_model_returns_the_gradient_of_its_energy(energy):
    model = small(energy=energy)
    plain = small()  # same seed -> same weights, no energy head
    plain.load_state_dict(model.state_dict())
    x, ts = clip_batch([24, 12])
    with torch.no_grad():  # like a sampler: the model turns gradients on by itself
        f = model(x, ts)
    assert not f.requires_grad
    xg = x.clone().requires_grad_(True)
    h = plain(xg, ts)
    E = (xg * h).flatten(1).sum(1) if energy == "dot" else -0.5 * h.pow(2).flatten(1).sum(1)
    torch.testing.assert_close(model.energy_value(x, ts), E.detach())
    (ref,) = torch.autograd.grad(E.sum(), xg)
    torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-4)
