"""Properties of the time-aware positional encodings (eqm.embed), for sincos and RoPE."""

import math

import numpy as np
import pytest
import torch

from eqm import embed as E
from eqm.errors import EqmError
from eqm.config import EQM_SIZES, EqMConfig
from eqm.model import EqMTransformer
from eqm.timebase import uniform_timestamps


# ----------------------------------------------------------------------------- references

def dit_2d_sincos_reference(embed_dim, grid_size):
    """DiT/MAE get_2d_sincos_pos_embed, written out from its definition: the grid is built with
    np.meshgrid(grid_w, grid_h) (w first), grid[0] (= column) feeds the first half of the channels,
    each half is [sin(pos * omega) | cos(pos * omega)] with omega_i = 1 / 10000^(i / (D/4))."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def rope_2d_reference(x, rows, cols, d_row, d_col, offset):
    """Axial 2D RoPE written with explicit loops: channels [offset, offset + d_row) rotate by row,
    the next d_col by col, pair (2i, 2i+1) of a d-group by angle pos * 10000^(-2i/d)."""
    out = x.clone()
    N = x.shape[-2]
    for n in range(N):
        for base_ch, d, p in ((offset, d_row, rows[n]), (offset + d_row, d_col, cols[n])):
            for i in range(d // 2):
                ang = float(p) * 10000.0 ** (-2.0 * i / d)
                a, b = x[..., n, base_ch + 2 * i], x[..., n, base_ch + 2 * i + 1]
                out[..., n, base_ch + 2 * i] = a * math.cos(ang) - b * math.sin(ang)
                out[..., n, base_ch + 2 * i + 1] = a * math.sin(ang) + b * math.cos(ang)
    return out


def coords_for(timestamps, grid=(3, 4), mode="seconds", ref_fps=24.0, temporal_patch=1):
    T = timestamps.shape[-1]
    tau = E.temporal_coords(timestamps, T, time_mode=mode, ref_fps=ref_fps, temporal_patch=temporal_patch)
    return E.token_coords(tau, *grid)


ENCODINGS = {
    "sincos": lambda c: E.sincos_3d(c, 64, 0.25),
    "rope": lambda c: torch.cat(E.rope_cos_sin(c, 32, 0.25), dim=-1)[:, 0],
}


# ----------------------------------------------------------------------------- T = 1 == image

@pytest.mark.parametrize("dim,grid", [(64, 4), (384, 16), (1152, 8)])
def test_t1_sincos_is_dit_2d_layout(dim, grid):
    ref = torch.from_numpy(dit_2d_sincos_reference(dim, grid)).float()
    table = E.sincos_grid_2d(dim, grid, grid)
    torch.testing.assert_close(table, ref, atol=2e-6, rtol=0)
    # The first half of the channels follows the column: equal across a row, different across columns.
    assert torch.equal(table[0, : dim // 2], table[grid, : dim // 2])  # (row 0, col 0) vs (row 1, col 0)
    assert not torch.allclose(table[0, : dim // 2], table[1, : dim // 2])  # (row 0, col 0) vs (row 0, col 1)
    # A single frame (tau = 0) of the 3D code is exactly the 2D table, whatever its timestamp.
    one = E.sincos_3d(coords_for(torch.tensor([[3.7]]), (grid, grid)), dim, 0.25)[0]
    assert torch.equal(one, table)


def test_t1_rope_is_axial_2d_rope():
    hd = 16
    d_t, d_row, d_col = E.rope_split(hd, 0.25)
    coords = coords_for(torch.tensor([[0.0]]), (3, 4))
    cos, sin = E.rope_cos_sin(coords, hd, 0.25)
    q = torch.randn(2, 3, coords.shape[1], hd)
    got = E.apply_rope(q, cos, sin)
    ref = rope_2d_reference(q, coords[0, :, 1], coords[0, :, 2], d_row, d_col, offset=d_t)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[..., :d_t], q[..., :d_t])  # time channels are not rotated at tau = 0


# ----------------------------------------------------------------------------- time in seconds

@pytest.mark.parametrize("kind", ["sincos", "rope"])
def test_frame_k_at_f_fps_encodes_like_time_k_over_f(kind):
    enc = ENCODINGS[kind]
    for fps in (8, 24, 30000 / 1001, 60, 240):
        ts = uniform_timestamps(6, fps)
        seconds = torch.tensor([k / fps for k in range(6)], dtype=torch.float32)
        torch.testing.assert_close(enc(coords_for(ts[None])), enc(coords_for(seconds[None])), atol=1e-6, rtol=0)
    # and tau is seconds * ref_fps: at fps == ref_fps the code equals the frame-index code
    ts = uniform_timestamps(6, 24)
    torch.testing.assert_close(
        enc(coords_for(ts[None], ref_fps=24.0)), enc(coords_for(ts[None], mode="index")), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("kind", ["sincos", "rope"])
def test_24_and_30_fps_agree_at_equal_seconds(kind):
    enc = ENCODINGS[kind]
    a = enc(coords_for(uniform_timestamps(9, 24)[None]))  # frames 0, 4, 8 are at 0, 1/6, 1/3 s
    b = enc(coords_for(uniform_timestamps(11, 30)[None]))  # frames 0, 5, 10 are at 0, 1/6, 1/3 s
    per_frame = 12  # tokens of one frame for the (3, 4) grid
    for ka, kb in ((0, 0), (4, 5), (8, 10)):
        torch.testing.assert_close(
            a[:, ka * per_frame:(ka + 1) * per_frame], b[:, kb * per_frame:(kb + 1) * per_frame], atol=1e-5, rtol=0
        )
    # while in index mode they would disagree (frame 4 vs frame 5)
    ai = enc(coords_for(uniform_timestamps(9, 24)[None], mode="index"))
    bi = enc(coords_for(uniform_timestamps(11, 30)[None], mode="index"))
    assert not torch.allclose(ai[:, 4 * per_frame:5 * per_frame], bi[:, 5 * per_frame:6 * per_frame], atol=1e-3)


@pytest.mark.parametrize("kind", ["sincos", "rope"])
def test_mixed_rate_batch_equals_each_sample_alone(kind):
    enc = ENCODINGS[kind]
    rates = [8, 60, 30000 / 1001]
    ts = torch.stack([uniform_timestamps(5, f) for f in rates])
    ts[1] = ts[1] + 0.25  # an offset clip: positions are relative to its own first frame
    batch = enc(coords_for(ts))
    for i, f in enumerate(rates):
        alone = enc(coords_for(uniform_timestamps(5, f)[None]))
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_temporal_patch_takes_mean_time_of_its_frames():
    ts = torch.tensor([[0.0, 0.1, 0.3, 0.7]])
    tau = E.temporal_coords(ts, 4, time_mode="seconds", ref_fps=10.0, temporal_patch=2)
    torch.testing.assert_close(tau, torch.tensor([[0.5, 5.0]]))
    with pytest.raises(EqmError):
        E.temporal_coords(ts, 4, temporal_patch=3)
    with pytest.raises(EqmError):
        E.temporal_coords(ts, 5)  # wrong number of frames


def test_timestamps_none_and_index_mode_use_frame_index():
    tau = E.temporal_coords(None, 4, time_mode="seconds")
    assert torch.equal(tau, torch.arange(4.0)[None])
    tau = E.temporal_coords(torch.tensor([[0.0, 0.5, 0.6]]), 3, time_mode="index")
    assert torch.equal(tau, torch.arange(3.0)[None])
    with pytest.raises(EqmError):
        E.temporal_coords(None, 4, time_mode="frames")


def test_time_offset_shifts_each_clip_and_model_positions_follow():
    """train.time_shift: a per-clip tau offset, in every mode; positions() passes it through."""
    ts = torch.stack([uniform_timestamps(4, 8), uniform_timestamps(4, 24)])
    off = torch.tensor([0.0, 5.5])
    for mode in ("seconds", "index"):
        base = E.temporal_coords(ts, 4, time_mode=mode, ref_fps=24.0)
        torch.testing.assert_close(E.temporal_coords(ts, 4, time_mode=mode, ref_fps=24.0, offset=off), base + off[:, None])
    with pytest.raises(EqmError, match="2 clips"):
        E.temporal_coords(ts, 4, offset=torch.zeros(3))
    model = EqMTransformer(EqMConfig(input_size=8, num_frames=4, patch_size=2, in_channels=3, hidden_size=32, depth=1,
                           num_heads=2, num_classes=0))
    tau = E.temporal_coords(ts, 4, ref_fps=model.config.ref_fps) + off[:, None]
    want = model.pos_embed.float().repeat(1, 4, 1) + E.sincos_time(E.token_coords(tau, 4, 4)[..., 0], 32, model.config.time_frac)
    torch.testing.assert_close(model.positions(ts, tau_offset=off).add, want)
    assert torch.equal(model.positions(ts, tau_offset=torch.zeros(2)).add, model.positions(ts).add)


def test_rope_is_relative_in_time():
    """q.k after RoPE depends on coordinate differences only: shifting all tau changes nothing."""
    hd = 32
    coords = coords_for(uniform_timestamps(3, 12)[None])
    shifted = coords.clone()
    shifted[..., 0] += 17.25
    q, k = torch.randn(2, 1, 2, coords.shape[1], hd).unbind(0)
    logits = E.apply_rope(q, *E.rope_cos_sin(coords, hd)) @ E.apply_rope(k, *E.rope_cos_sin(coords, hd)).transpose(-1, -2)
    logits2 = E.apply_rope(q, *E.rope_cos_sin(shifted, hd)) @ E.apply_rope(k, *E.rope_cos_sin(shifted, hd)).transpose(-1, -2)
    torch.testing.assert_close(logits, logits2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("order", E.TIME_ORDERS)
def test_sincos_time_part_is_where_the_docs_say(order):
    dim, frac = 64, 0.25
    d_t = E.sincos_time_channels(dim, frac)
    assert d_t == 16
    part = E.sincos_time(torch.tensor([0.0, 1.0, 2.5]), dim, frac, order=order)
    assert torch.equal(part[0], torch.zeros(dim))  # vanishes at tau = 0
    nz = part[1:].abs().sum(0) > 0
    expected = torch.zeros(dim, dtype=torch.bool)
    expected[dim // 2 - d_t // 2: dim // 2] = True
    expected[dim - d_t // 2:] = True
    assert torch.equal(nz, expected)
    # and it is the 1D sin/cos code of tau (minus its value at 0), fastest frequency on the last
    # channel of each half when paired, on the first when aligned
    code = E.sincos_1d(torch.tensor(2.5), d_t)
    sin_half, cos_half = code[: d_t // 2], code[d_t // 2:] - 1
    if order == "paired":
        sin_half, cos_half = sin_half.flip(0), cos_half.flip(0)
    torch.testing.assert_close(part[2, expected], torch.cat([sin_half, cos_half]))
    # read_sincos_time undoes the layout
    got_sin, got_cos = E.read_sincos_time(part[2], dim, frac, order=order)
    torch.testing.assert_close(torch.cat([got_sin, got_cos]), torch.cat([code[: d_t // 2], code[d_t // 2:] - 1]))


def _interference(order: str, dim: int, frac: float) -> float:
    """max over channels of min(spatial range over a 16-patch grid, temporal range over tau 0-30)."""
    pos = torch.arange(16.0)
    spatial = E.sincos_2d(pos, pos, dim)  # rows = cols = 0..15: every channel sweeps its own axis
    temporal = E.sincos_time(torch.linspace(0.0, 30.0, 61), dim, frac, order=order)
    s_range = spatial.amax(0) - spatial.amin(0)
    t_range = temporal.amax(0) - temporal.amin(0)
    return float(torch.minimum(s_range, t_range).max())


def test_paired_order_keeps_time_off_the_varying_spatial_channels():
    # At time_frac 1/2 (the tiny recipe), the first layout stacks sin(tau) onto cos(col): both
    # swing over their whole range on the same channel.  paired keeps every channel quiet in one of them.
    # (measured: 2.0 aligned, 0.11 paired, at both tiny and S width)
    for dim in (64, 384):
        assert _interference("aligned", dim, 0.5) > 1.5
        assert _interference("paired", dim, 0.5) < 0.15
        # at the default quarter both layouts use only the flat half of the spatial frequencies (~0.01)
        assert _interference("aligned", dim, 0.25) < 0.02
        assert _interference("paired", dim, 0.25) < 0.02
    with pytest.raises(EqmError, match="time_order"):
        E.sincos_time(torch.zeros(2), 64, 0.5, order="sideways")


# ----------------------------------------------------------------------------- splits and errors

@pytest.mark.parametrize("size", list(EQM_SIZES))
def test_channel_splits_for_every_size(size):
    cfg = EQM_SIZES[size]
    D, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_heads"]
    d_t = E.sincos_time_channels(D, E.DEFAULT_TIME_FRAC)
    assert d_t % 2 == 0 and 0 < d_t // 2 <= D // 4
    split = E.rope_split(hd, E.DEFAULT_TIME_FRAC)
    assert sum(split) == hd and all(s % 2 == 0 and s > 0 for s in split)


def test_bad_splits_raise():
    with pytest.raises(EqmError):
        E.rope_split(15)
    with pytest.raises(EqmError):
        E.rope_split(4, 0.5)  # t=2 leaves 2 channels for rows and columns
    with pytest.raises(EqmError):
        E.sincos_time_channels(66)
    with pytest.raises(EqmError):
        E.sincos_time_channels(64, 0.6)
    assert E.sincos_time_channels(72, 0.25) == 18
    with pytest.raises(EqmError):
        E.sincos_time_channels(68, 0.25)  # 17 time channels: odd


def test_clip_fps_is_each_clips_mean_rate():
    ts = torch.stack([uniform_timestamps(5, 8), uniform_timestamps(5, 60), uniform_timestamps(5, 30000 / 1001)])
    torch.testing.assert_close(E.clip_fps(ts, 24.0), torch.tensor([8.0, 60.0, 30000 / 1001]), rtol=1e-5, atol=0)
    assert E.clip_fps(torch.zeros(2, 1), 24.0).tolist() == [24.0, 24.0]  # T = 1: documented default
    with pytest.raises(EqmError):
        E.clip_fps(torch.zeros(1, 3), 24.0)


def test_positions_select_and_cat():
    add = torch.randn(3, 5, 8)
    p = E.Positions(add=add, rope=None, fps=torch.tensor([1.0, 2.0, 3.0]), num_frames=2, num_tokens=5)
    q = p.select(torch.tensor([2, 0]))
    assert torch.equal(q.add, add[[2, 0]]) and q.fps.tolist() == [3.0, 1.0]
    both = E.Positions.cat([p, p])
    assert both.batch == 6 and torch.equal(both.add[3:], add)
    shared = E.Positions(add=add[:1], rope=None, fps=None, num_frames=2, num_tokens=5)
    assert E.Positions.cat([shared, shared]).add.shape[0] == 2
    assert shared.select(torch.tensor([0, 0, 0])).add.shape[0] == 1  # broadcast rows stay broadcast


def test_ref_fps_measurement_supports_the_documented_choice():
    """docs/embedding.md#choosing-ref_fps: r = 1 is nearly degenerate, r = 24 separates up to 240 fps."""
    assert E.DEFAULT_REF_FPS == 24.0
    assert E.adjacent_frame_similarity(30, 1, 96) > 0.99996
    assert E.adjacent_frame_similarity(240, 24, 96) < 0.99968
    assert 1 - E.adjacent_frame_similarity(240, 24, 96) > 8.5 * (1 - E.adjacent_frame_similarity(30, 1, 96))
    assert E.adjacent_frame_similarity(24, 24, 96) == pytest.approx(0.968894, abs=1e-6)
