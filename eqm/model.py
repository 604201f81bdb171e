"""The EqM transformer: a DiT/SiT-style model for clips with real timestamps (docs/reference.md#model).

Read top to bottom: embedders, attention with optional 3D RoPE, the adaLN-Zero block, the final
layer and the model, built from an :class:`eqm.config.EqMConfig`.  For 4D input it is the official
EqM/SiT image model, parameter names and shapes included, so an official checkpoint loads with
``strict=True``; video input reuses the same modules.  The model is not told gamma (its
timestep embedder is fed 0), and explicit-energy models return grad_x E (attention then runs on
the math SDPA backend, the only one with double backward).  The key table and the video-mode rules: docs/design.md#model.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import embed as E
from .config import EqMConfig
from .errors import EqmError


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                 Embedding layers for timesteps, labels and frame rates        #
#################################################################################

def sinusoidal_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE/DiT scalar features [cos(w t) | sin(w t)], w_i = max_period^(-i/half): (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder.  EqM keeps it for checkpoint compatibility and always feeds it 0."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(sinusoidal_features(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; drops labels to the null id (= num_classes) for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        # The official rule (num_classes + 1 rows when dropout > 0), plus a null row for
        # unconditional models (num_classes = 0), which otherwise would have no row at all.
        use_cfg_embedding = int(dropout_prob > 0 or num_classes == 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class FpsEmbedder(TimestepEmbedder):
    """fps-embed mode: a clip's frame rate -> a vector added to the conditioning c.

    Features are sinusoids of 100 * ln(fps): a 1 % rate change moves the fastest feature by
    1 rad, and the slowest ones still vary across 1..1000 fps.  Then the DiT embedder MLP (same
    layers and parameter names as TimestepEmbedder).
    """

    LOG_SCALE = 100.0

    def forward(self, fps):
        feats = sinusoidal_features(self.LOG_SCALE * torch.log(fps.float()), self.frequency_embedding_size)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


#################################################################################
#                       Patch embedding, attention, MLP                         #
#################################################################################

class PatchEmbed(nn.Module):
    """(B, C, T, H, W) -> tokens (B, T/p_t * H/p * W/p, D), ordered (time, row, col).

    p_t = 1: the image Conv2d on every frame (timm PatchEmbed weights); p_t > 1: a Conv3d.
    """

    def __init__(self, in_channels, hidden_size, patch_size, temporal_patch):
        super().__init__()
        self.patch_size = (patch_size, patch_size)  # like timm, for code that reads it
        self.temporal_patch = temporal_patch
        if temporal_patch == 1:
            self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)
        else:
            k = (temporal_patch, patch_size, patch_size)
            self.proj = nn.Conv3d(in_channels, hidden_size, k, stride=k, bias=True)

    def forward(self, x):
        B, C, T, H, W = x.shape
        if self.temporal_patch == 1:
            x = self.proj(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, D, h, w)
            return x.flatten(2).transpose(1, 2).reshape(B, -1, x.shape[1])
        return self.proj(x).flatten(2).transpose(1, 2)


def _sdpa(q, k, v, math_sdpa: bool):
    if math_sdpa:  # double backward (energy training) needs the math kernel
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """timm-compatible multi-head self-attention (qkv, proj) on SDPA, with optional 3D RoPE."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None, math_sdpa=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        if rope is not None:
            q, k = E.apply_rope(q, *rope), E.apply_rope(k, *rope)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # PyTorch's CPU flash attention is several times slower in bf16 than in fp32 (its
            # backward above all): under bf16 autocast the projections run in bf16, SDPA in fp32.
            with torch.autocast("cpu", enabled=False):
                x = _sdpa(q.float(), k.float(), v.float(), math_sdpa)
        else:
            x = _sdpa(q, k, v, math_sdpa)
        return self.proj(x.transpose(1, 2).reshape(B, N, C).to(qkv.dtype))


class Mlp(nn.Module):
    """timm Mlp (fc1, GELU-tanh, fc2)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#                                 Core EqM model                                #
#################################################################################

def frames_view(x: torch.Tensor, hw: int) -> torch.Tensor:
    """(B, T*hw, ...) tokens in (time, row, col) order -> (B*T, hw, ...): one sequence per frame."""
    return x.reshape(-1, hw, *x.shape[2:])


def tracks_view(x: torch.Tensor, hw: int) -> torch.Tensor:
    """(B, T*hw, ...) -> (B*hw, T, ...): one sequence per patch position, across the frames."""
    B, N = x.shape[:2]
    return x.reshape(B, N // hw, hw, *x.shape[2:]).transpose(1, 2).reshape(B * hw, N // hw, *x.shape[2:])


def from_tracks(x: torch.Tensor, B: int) -> torch.Tensor:
    """Inverse of :func:`tracks_view`: (B*hw, T, ...) -> (B, T*hw, ...)."""
    hw, T = x.shape[0] // B, x.shape[1]
    return x.reshape(B, hw, T, *x.shape[2:]).transpose(1, 2).reshape(B, T * hw, *x.shape[2:])


def _rope_view(rope, B: int, hw: int, view):
    """RoPE (cos, sin), each (B|1, 1, N, d), laid out like the tokens under ``view``."""
    return tuple(view(r.expand(B, -1, -1, -1).squeeze(1), hw).unsqueeze(1) for r in rope)


def divided_rope(rope, B: int, hw: int):
    """(per frame, per patch position) layouts of RoPE for divided blocks, or None without RoPE;
    built once per forward and shared by every block."""
    if rope is None:
        return None
    return _rope_view(rope, B, hw, frames_view), _rope_view(rope, B, hw, tracks_view)


class EqMBlock(nn.Module):
    """A DiT/SiT block with adaptive layer norm zero (adaLN-Zero) conditioning.

    ``divided=True`` adds attention across frames (``temporal_attn``, one sequence per patch
    position) before DiT's attention, which then runs within each frame.  Its output projection
    starts at zero, so a new divided block computes exactly what the image block computes.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, divided=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.divided = divided
        if divided:
            self.norm_t = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.temporal_attn = Attention(hidden_size, num_heads=num_heads)

    def forward(self, x, c, rope=None, math_sdpa=False, hw=None):
        """rope: (cos, sin) for a full block; for a divided one :func:`divided_rope`'s pair."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.divided:
            per_frame, per_track = rope if rope is not None else (None, None)
            x = x + self._across_frames(modulate(self.norm_t(x), shift_msa, scale_msa), per_track, math_sdpa, hw)
            h = modulate(self.norm1(x), shift_msa, scale_msa)
            a = self.attn(frames_view(h, hw), per_frame, math_sdpa)
            x = x + gate_msa.unsqueeze(1) * a.reshape(x.shape)
        else:
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, math_sdpa)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def _across_frames(self, h, rope, math_sdpa, hw):
        out = self.temporal_attn(tracks_view(h, hw), rope, math_sdpa)
        return from_tracks(out, h.shape[0])


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN, then a linear map to one patch of output per token."""

    def __init__(self, hidden_size, patch_volume, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class EqMTransformer(nn.Module):
    """Equilibrium Matching transformer over clips (B, C, T, H, W) with per-frame timestamps.

    ``EqMTransformer(config)`` builds the modules an :class:`~eqm.config.EqMConfig` describes and
    keeps it as ``model.config``.  forward(x, timestamps, y) returns f(x), the learned equilibrium
    gradient (same shape as x), which points from noise towards data; samplers ascend it.
    Checkpoint compatibility: docs/design.md#parameter-names; positional encodings: eqm.embed.
    """

    def __init__(self, config: EqMConfig):
        super().__init__()
        if not isinstance(config, EqMConfig):
            raise TypeError(f"EqMTransformer takes an EqMConfig, got {type(config).__name__}")
        self.config = cfg = config
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size, cfg.temporal_patch)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        if cfg.time_mode == "fps-embed":
            self.fps_embedder = FpsEmbedder(D)
        if cfg.pos == "sincos":
            # Fixed 2D sin/cos, stored like DiT (a Parameter without grad: official key "pos_embed").
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid[0] * cfg.grid[1], D), requires_grad=False)
        divided = cfg.attention == "divided"
        self.blocks = nn.ModuleList([EqMBlock(D, cfg.num_heads, cfg.mlp_ratio, divided) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.temporal_patch * cfg.patch_size ** 2, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.config.pos == "sincos":
            self.pos_embed.data.copy_(E.sincos_grid_2d(self.config.hidden_size, *self.config.grid)[None])
        # Patch embedding initialised like nn.Linear (instead of a conv):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.config.time_mode == "fps-embed":
            nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.fps_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            if block.divided:  # attention across frames starts as nothing: the block is the image block
                nn.init.constant_(block.temporal_attn.proj.weight, 0)
                nn.init.constant_(block.temporal_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # ------------------------------------------------------------------ positions

    def positions(
        self, timestamps: Optional[torch.Tensor] = None, num_frames: Optional[int] = None,
        tau_offset: Optional[torch.Tensor] = None,
    ) -> E.Positions:
        """Everything derived from the frames' coordinates; compute once per sampling run, pass as pos=.

        timestamps: (B, T) or (T,) seconds, or None (frame-index positions; images: T = 1).
        tau_offset: (B,) temporal offset per clip in tau units (training's ``train.time_shift``).
        """
        cfg = self.config
        if timestamps is not None:
            timestamps = E.check_timestamps(timestamps, num_frames)
            num_frames = timestamps.shape[1]
            device = timestamps.device
        else:
            num_frames = cfg.num_frames if num_frames is None else num_frames
            device = self.t_embedder.mlp[0].weight.device
        tau = E.temporal_coords(
            timestamps, num_frames, time_mode=cfg.time_mode, ref_fps=cfg.ref_fps,
            temporal_patch=cfg.temporal_patch, device=device, offset=tau_offset,
        )
        coords = E.token_coords(tau, *cfg.grid)  # (B|1, N, 3)
        add = rope = fps = None
        if cfg.pos == "sincos":
            spatial = self.pos_embed.float().repeat(1, tau.shape[1], 1)  # the (loadable) image table, per frame
            add = spatial + E.sincos_time(coords[..., 0], cfg.hidden_size, cfg.time_frac, order=cfg.time_order)
        else:
            rope = E.rope_cos_sin(coords, cfg.hidden_size // cfg.num_heads, cfg.time_frac)
        if cfg.time_mode == "fps-embed":
            fps = E.clip_fps(timestamps, cfg.ref_fps, device=device)
        return E.Positions(add=add, rope=rope, fps=fps, num_frames=num_frames, num_tokens=coords.shape[1])

    # ------------------------------------------------------------------ forward

    def unpatchify(self, x, T):
        """(B, N, p_t*p*p*C_out) -> (B, C_out, T, H, W); per frame this is DiT's 'nhwpqc->nchpwq'."""
        B = x.shape[0]
        pt, p, c = self.config.temporal_patch, self.config.patch_size, self.config.out_channels
        h, w = self.config.grid
        x = x.reshape(B, T // pt, h, w, pt, p, p, c)
        x = torch.einsum("nthwupqc->nctuhpwq", x)
        return x.reshape(B, c, T, h * p, w * p)

    def _check_input(self, x):
        if x.ndim == 4:
            if self.config.temporal_patch != 1:
                raise EqmError(f"a model with temporal_patch={self.config.temporal_patch} needs clips (B, C, T, H, W), got an image batch")
            x = x.unsqueeze(2)
        if x.ndim != 5:
            raise EqmError(f"model input must be (B, C, T, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
        B, C, T, H, W = x.shape
        cfg = self.config
        if C != cfg.in_channels or (H, W) != cfg.input_size:
            raise EqmError(
                f"model expects {cfg.in_channels} channels at {cfg.input_size[0]}x{cfg.input_size[1]}, "
                f"got {C} channels at {H}x{W}"
            )
        if T % self.config.temporal_patch:
            raise EqmError(f"{T} frames cannot be cut into temporal patches of {self.config.temporal_patch}")
        return x

    def network(self, x, y=None, pos: Optional[E.Positions] = None, math_sdpa=False):
        """The transformer h(x) on a clip (B, C, T, H, W); forward() = h, or grad of an energy of h."""
        B, _, T = x.shape[:3]
        if pos is None:
            pos = self.positions(None, T)
        tokens = self.x_embedder(x)
        if tokens.shape[1] != pos.num_tokens or pos.batch not in (1, B):
            raise EqmError(
                f"positions were built for {pos.num_tokens} tokens x batch {pos.batch}, "
                f"the input has {tokens.shape[1]} tokens x batch {B}"
            )
        if pos.add is not None:
            tokens = tokens + pos.add.to(tokens.dtype)
        if y is None:
            y = torch.full((B,), self.config.num_classes, dtype=torch.long, device=x.device)
        t = self.t_embedder(torch.zeros(B, device=x.device))  # EqM: the model is never told gamma
        c = t + self.y_embedder(y, self.training)
        if pos.fps is not None:
            c = c + self.fps_embedder(pos.fps.expand(B))
        hw = self.config.grid[0] * self.config.grid[1]
        rope = divided_rope(pos.rope, B, hw) if self.config.attention == "divided" else pos.rope
        for block in self.blocks:
            tokens = block(tokens, c, rope, math_sdpa, hw)
        out = self.unpatchify(self.final_layer(tokens, c), T)
        if self.config.learn_sigma:
            out = out[:, : self.config.in_channels]
        return out

    def _energy(self, x, h):
        if self.config.energy == "dot":
            return (x * h).flatten(1).sum(1)
        return -0.5 * h.pow(2).flatten(1).sum(1)

    def forward(self, x, timestamps=None, y=None, *, pos: Optional[E.Positions] = None, create_graph: Optional[bool] = None):
        """f(x): x (B, C, T, H, W) or image (B, C, H, W); timestamps (B, T) seconds or None;
        y (B,) long or None (null class).  pos: precomputed ``self.positions(timestamps, T)``.

        Energy models: create_graph defaults to torch.is_grad_enabled() (True in training, so the
        loss reaches the weights; False under no_grad sampling).
        """
        image = x.ndim == 4
        x5 = self._check_input(x)
        if pos is None:
            pos = self.positions(timestamps, x5.shape[2])
        if self.config.energy is None:
            out = self.network(x5, y, pos)
        else:
            create = torch.is_grad_enabled() if create_graph is None else create_graph
            with torch.enable_grad():
                xin = x5 if x5.requires_grad else x5.detach().requires_grad_(True)
                energy = self._energy(xin, self.network(xin, y, pos, math_sdpa=create))
                (out,) = torch.autograd.grad(energy.sum(), xin, create_graph=create)
        return out.squeeze(2) if image else out

    def energy_value(self, x, timestamps=None, y=None, *, pos: Optional[E.Positions] = None):
        """The scalar E(x) per sample (B,) of an energy model, with f = +grad_x E.

        Sampling ascends E; the usual EBM energy (low = likely) is -E, which is what the official
        code's get_energy returns.
        """
        if self.config.energy is None:
            raise EqmError("this model has no explicit energy (its config has energy=None)")
        x5 = self._check_input(x)
        if pos is None:
            pos = self.positions(timestamps, x5.shape[2])
        return self._energy(x5, self.network(x5, y, pos))
