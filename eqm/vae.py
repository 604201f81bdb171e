"""VAEs from diffusers, loaded from a local folder: encode clips to normalised latents and back.

Two kinds (docs/latent.md):

* ``image``: a per-frame image VAE (``AutoencoderKL``, e.g. SD-VAE: 8x spatial, 4 channels). Every
  frame is encoded on its own, so latent frame k keeps source frame k's timestamp.
* ``video``: a causal video VAE (``AutoencoderKLWan``, Wan2.1: 4x temporal, 8x spatial, 16
  channels). Clips have 4k + 1 frames; latent 0 covers frame 0, latent k >= 1 covers frames
  4k - 3 .. 4k and takes the mean of their timestamps (:func:`latent_timestamps`).

Normalisation comes from the VAE's own config and is applied on encode, undone on decode:
``z_norm = (z - shift) * scale`` with (shift, scale) = (shift_factor or 0, scaling_factor) for SD-VAE,
per channel (latents_mean, scaling_factor / latents_std) when an AutoencoderKL config has them,
and (latents_mean, 1 / latents_std) for Wan.

Weights load only from a local folder with safetensors files (``from_pretrained(...,
local_files_only=True, use_safetensors=True)``): nothing is downloaded and no pickle is read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import EqmError

PathLike = Union[str, Path]

#: diffusers class name -> our kind. The config's "_class_name" decides.
VAE_CLASSES = {"AutoencoderKL": "image", "AutoencoderKLWan": "video"}

#: What to download for each kind, named in the errors of a missing folder.
DOWNLOAD_HINT = (
    "download stabilityai/sd-vae-ft-ema (image VAE) or the vae/ subfolder of "
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (video VAE), e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema "
    "--local-dir models/sd-vae-ft-ema`, and point vae.path (or --vae) at that folder"
)

#: The weights file of a diffusers model folder (pickled .bin files are never read).
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

#: Frames decoded per call by the image VAE: bounds decoder activations for long clips.
DECODE_CHUNK = 8

# Config keys that say nothing about the weights' meaning (left out of the identity hash).
_VOLATILE_KEYS = ("_diffusers_version", "_name_or_path", "_use_default_values")


# ============================================================================================
# Latent timestamps: one rule, used by the cache, training and sampling
# ============================================================================================


def latent_timestamps(timestamps, temporal: int = 1):
    """Timestamps of the latent frames of a clip whose source frames have ``timestamps`` (..., T).

    temporal = 1 (per-frame VAE): the source timestamps themselves. temporal = s > 1 (causal
    video VAE, T = s*k + 1): latent 0 has frame 0's time, latent k >= 1 the mean time of frames
    s*k - s + 1 .. s*k (the frames it decodes to). Works on tensors and numpy arrays, any leading
    batch shape, so a variable-frame-rate clip keeps its irregular times.
    """
    check_num_frames(int(timestamps.shape[-1]), temporal)
    if temporal == 1:
        return timestamps
    first, rest = timestamps[..., :1], timestamps[..., 1:]
    groups = rest.reshape(*rest.shape[:-1], -1, temporal).mean(-1)
    if isinstance(timestamps, torch.Tensor):
        return torch.cat([first, groups], dim=-1)
    import numpy as np

    return np.concatenate([first, groups], axis=-1)


def check_num_frames(num_frames: int, temporal: int, *, what: str = "a clip") -> None:
    """EqmError unless ``num_frames`` fits the VAE's frame rule (s*k + 1 frames for temporal s)."""
    if num_frames < 1:
        raise EqmError(f"{what} needs at least 1 frame, got {num_frames}")
    if temporal > 1 and (num_frames - 1) % temporal:
        lo = (num_frames - 1) // temporal * temporal + 1
        raise EqmError(
            f"{what} has {num_frames} frames; a video VAE with {temporal}x temporal compression needs "
            f"{temporal}k+1 frames (e.g. {lo} or {lo + temporal})"
        )


def num_latent_frames(num_frames: int, temporal: int = 1) -> int:
    """Latent frames of a clip of ``num_frames`` source frames (validated)."""
    check_num_frames(num_frames, temporal)
    return 1 + (num_frames - 1) // temporal


def num_decoded_frames(num_latents: int, temporal: int = 1) -> int:
    """Source frames that ``num_latents`` latent frames decode to: temporal*(n - 1) + 1."""
    return temporal * (int(num_latents) - 1) + 1


@dataclass(frozen=True)
class LatentPlan:
    """What to sample for a clip of ``num_frames`` frames at ``fps``: ``num_latents`` latent
    frames at ``latent_timestamps`` (seconds), decoding to frames at ``frame_timestamps`` = k / fps."""

    fps: Fraction
    num_frames: int
    num_latents: int
    frame_timestamps: torch.Tensor
    latent_timestamps: torch.Tensor


def plan_latents(fps, num_frames: int, temporal: int = 1) -> LatentPlan:
    """The inverse of encoding for sampling: T frames at ``fps`` -> latent count and timestamps.

    The latents get the timestamps the cache gives the latents of real frames at k / fps (the
    same :func:`latent_timestamps` rule), so the model sees the positions it was trained on.
    """
    from .timebase import parse_fps, uniform_timestamps

    fps = parse_fps(fps)
    check_num_frames(num_frames, temporal, what=f"a clip of {num_frames} frames at {fps} fps")
    ts = uniform_timestamps(num_frames, fps, dtype=torch.float64)
    lt = latent_timestamps(ts, temporal)
    return LatentPlan(fps=fps, num_frames=num_frames, num_latents=int(lt.shape[-1]),
                      frame_timestamps=ts.float(), latent_timestamps=lt.float())


# ============================================================================================
# Loading
# ============================================================================================


@dataclass(frozen=True)
class VaeIdentity:
    """Which VAE made a set of latents: diffusers class, hash of its config, a fingerprint of its
    weights file, and where it was.

    Two identities ``match`` when class, config hash and weights fingerprint agree (the
    fingerprint tells apart fine-tunes that share a config, such as sd-vae-ft-ema and -mse);
    the path is recorded for people (a folder may move between the cache run and training).
    """

    class_name: str
    config_hash: str
    path: str
    weights_hash: str = ""

    def to_dict(self) -> dict:
        return {"class_name": self.class_name, "config_hash": self.config_hash, "weights_hash": self.weights_hash,
                "path": self.path}

    @classmethod
    def from_dict(cls, d: dict, where: str = "VAE identity") -> "VaeIdentity":
        try:
            return cls(class_name=str(d["class_name"]), config_hash=str(d["config_hash"]), path=str(d.get("path", "")),
                       weights_hash=str(d.get("weights_hash") or ""))
        except (KeyError, TypeError, AttributeError):
            raise EqmError(f"{where}: not a VAE identity (needs class_name and config_hash), got {d!r}") from None

    def matches(self, other: "VaeIdentity") -> bool:
        """Same class and config, and same weights where both record them (records written
        before the fingerprint existed have none)."""
        same_weights = not (self.weights_hash and other.weights_hash) or self.weights_hash == other.weights_hash
        return self.class_name == other.class_name and self.config_hash == other.config_hash and same_weights

    def describe(self) -> str:
        weights = f", weights {self.weights_hash[:12]}" if self.weights_hash else ""
        return f"{self.class_name} (config {self.config_hash[:12]}{weights}) at {self.path}"


def config_hash(config: dict) -> str:
    """sha256 of a VAE config with sorted keys, without the version and path entries."""
    clean = {k: v for k, v in config.items() if k not in _VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()


def find_vae_folder(path: PathLike) -> Path:
    """The folder holding the VAE's config.json: ``path`` itself or its ``vae/`` subfolder (a whole
    diffusers pipeline download). One-line EqmError saying what to download when there is none."""
    p = Path(path).expanduser()
    if not p.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith("."):
            raise EqmError(f"VAE '{path}' looks like a Hugging Face Hub name, but VAEs load only from a local "
                           f"folder here (no downloads): `huggingface-cli download {path} --local-dir "
                           f"models/{Path(str(path)).name}` on a connected machine, then use that folder")
        raise EqmError(f"VAE folder not found: {p}; {DOWNLOAD_HINT}")
    for cand in (p, p / "vae"):
        if (cand / "config.json").is_file():
            return cand
    raise EqmError(f"{p} has no config.json (nor vae/config.json): not a diffusers VAE folder; {DOWNLOAD_HINT}")


def read_vae_config(folder: Path) -> dict:
    """The VAE's config.json as a dict, its class checked against :data:`VAE_CLASSES`."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EqmError(f"cannot read {folder / 'config.json'}: {e}") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in VAE_CLASSES:
        raise EqmError(f"{folder / 'config.json'}: VAE class {name!r} is not supported "
                       f"(supported: {', '.join(VAE_CLASSES)})")
    return config


def weights_fingerprint(path: Path, chunks: int = 16, chunk_size: int = 1 << 16) -> str:
    """sha256 of a file's size and ``chunks`` evenly spaced blocks of it: reads about 1 MiB of a
    335 MB VAE, yet differs between any two trainings of the same architecture."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(chunks):
            f.seek(max(0, size - chunk_size) * k // max(1, chunks - 1))
            h.update(f.read(chunk_size))
    return h.hexdigest()


def vae_identity(path: PathLike) -> VaeIdentity:
    """The identity of the VAE in a local folder from its config and a fingerprint of its
    weights file (the weights are not loaded)."""
    folder = find_vae_folder(path)
    config = read_vae_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise EqmError(f"{folder} has no {WEIGHTS_FILE} (eqmctl loads VAE weights from safetensors only); {DOWNLOAD_HINT}")
    return VaeIdentity(config["_class_name"], config_hash(config), str(folder.resolve()), weights_fingerprint(weights))


def load_vae(path: PathLike, device="cpu", dtype: Optional[torch.dtype] = None) -> "Vae":
    """Load the VAE in local folder ``path`` (or its ``vae/`` subfolder); kind from its config.

    dtype: the precision it computes in (default float32); float16 is raised to float32 for a
    VAE whose config sets ``force_upcast``, as diffusers pipelines do."""
    import diffusers

    folder = find_vae_folder(path)
    config = read_vae_config(folder)
    identity = vae_identity(folder)
    if dtype == torch.float16 and config.get("force_upcast"):
        dtype = torch.float32  # SD-VAE overflows in float16 (its config says so); bfloat16 is fine
    cls = getattr(diffusers, config["_class_name"])
    try:
        module = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                     torch_dtype=dtype or torch.float32)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EqmError(f"cannot load the VAE in {folder} (needs config.json and diffusion_pytorch_model."
                       f"safetensors): {first}") from None
    return Vae(module.to(device).eval().requires_grad_(False), identity)


# ============================================================================================
# The wrapper
# ============================================================================================


class Vae:
    """A loaded diffusers VAE with our conventions: (B, 3, T, H, W) in [-1, 1] <-> normalised
    latents (B, C, T', h, w), float32 out, whatever dtype the VAE computes in."""

    def __init__(self, module, identity: VaeIdentity):
        self.module, self.identity = module, identity
        cfg = module.config
        self.kind = VAE_CLASSES[type(module).__name__]
        if self.kind == "image":
            self.latent_channels = int(cfg.latent_channels)
            self.spatial = 2 ** (len(cfg.block_out_channels) - 1)
            self.temporal = 1
            if cfg.latents_mean is not None and cfg.latents_std is not None:
                shift, scale = list(cfg.latents_mean), [cfg.scaling_factor / s for s in cfg.latents_std]
            else:
                shift, scale = [cfg.shift_factor or 0.0], [cfg.scaling_factor]
        else:
            self.latent_channels = int(cfg.z_dim)
            self.spatial = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
            self.temporal = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
            if self.temporal != 4:  # diffusers' Wan encoder reads 1 + 4k frames in chunks of 4
                raise EqmError(f"{identity.path}: AutoencoderKLWan with {self.temporal}x temporal compression is "
                               f"not supported (diffusers encodes in chunks of 4 frames; use 4x)")
            shift, scale = list(cfg.latents_mean), [1.0 / s for s in cfg.latents_std]
        shape = (1, -1, 1, 1, 1)
        self._shift = torch.tensor(shift, dtype=torch.float32).reshape(shape)
        self._scale = torch.tensor(scale, dtype=torch.float32).reshape(shape)
        if self._shift.numel() not in (1, self.latent_channels) or self._scale.numel() not in (1, self.latent_channels):
            raise EqmError(f"{identity.path}: latents_mean/latents_std must have {self.latent_channels} entries")
        module.enable_tiling()  # engages only above the VAE's tile size (256 px for SD-VAE and Wan)

    # -- geometry and time ----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', h, w) of a clip of that size; EqmError when the size does not fit the VAE."""
        if height % self.spatial or width % self.spatial:
            raise EqmError(f"frames of {height}x{width} px do not divide by the VAE's {self.spatial}x spatial "
                           f"compression ({self.identity.class_name})")
        return (self.latent_channels, num_latent_frames(num_frames, self.temporal),
                height // self.spatial, width // self.spatial)

    def latent_timestamps(self, timestamps):
        """Timestamps of the latent frames of a clip (:func:`latent_timestamps` with this VAE's rule)."""
        return latent_timestamps(timestamps, self.temporal)

    def plan(self, fps, num_frames: int) -> LatentPlan:
        """Latent count and timestamps for sampling ``num_frames`` frames at ``fps``."""
        return plan_latents(fps, num_frames, self.temporal)

    def describe(self) -> str:
        ts = f"{self.temporal}x temporal, " if self.temporal > 1 else "per frame, "
        return f"{self.kind} VAE {self.identity.class_name}: {ts}{self.spatial}x spatial, {self.latent_channels} channels"

    # -- normalisation --------------------------------------------------------------------

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self._shift.to(z.device)) * self._scale.to(z.device)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() / self._scale.to(z.device) + self._shift.to(z.device)

    def normalize_logvar(self, logvar: torch.Tensor) -> torch.Tensor:
        """log-variance of the posterior in normalised units: logvar + 2 log scale."""
        return logvar.float() + 2.0 * torch.log(self._scale.abs()).to(logvar.device)

    # -- encode / decode ------------------------------------------------------------------

    def _check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise EqmError(f"the VAE encodes videos of shape (B, 3, T, H, W), got {tuple(video.shape)}")
        self.latent_shape(video.shape[2], video.shape[3], video.shape[4])

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar) of ``video`` (B, 3, T, H, W) in [-1, 1], both normalised,
        each (B, C, T', h, w) float32 on the VAE's device."""
        self._check_video(video)
        x = video.to(self.device, self.dtype)
        B, _, T, H, W = x.shape
        if self.kind == "image":
            frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, 3, H, W)
            dists = [self.module.encode(c).latent_dist for c in frames.split(DECODE_CHUNK)]
            mean = torch.cat([d.mean for d in dists]).reshape(B, T, -1, H // self.spatial, W // self.spatial)
            logvar = torch.cat([d.logvar for d in dists]).reshape(mean.shape)
            mean, logvar = mean.permute(0, 2, 1, 3, 4), logvar.permute(0, 2, 1, 3, 4)
        else:
            dists = [self.module.encode(c).latent_dist for c in x.split(1)]
            mean, logvar = torch.cat([d.mean for d in dists]), torch.cat([d.logvar for d in dists])
        return self.normalize(mean), self.normalize_logvar(logvar)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised posterior mean (B, C, T', h, w) of ``video`` (B, 3, T, H, W) in [-1, 1]."""
        return self.encode_moments(video)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T', h, w) -> video (B, 3, T, H, W) in [-1, 1], float32 on the CPU.

        Sliced so long clips fit: the image VAE decodes DECODE_CHUNK frames at a time, the video
        VAE one clip at a time (it decodes causally, latent frame by latent frame); both tile
        frames larger than their tile size.
        """
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise EqmError(f"the VAE decodes latents of shape (B, {self.latent_channels}, T, h, w), "
                           f"got {tuple(latents.shape)}")
        z = self.denormalize(latents.to(self.device)).to(self.dtype)
        B, C, T, h, w = z.shape
        if self.kind == "image":
            flat = z.permute(0, 2, 1, 3, 4).reshape(B * T, C, h, w)
            out = torch.cat([self.module.decode(c).sample.float().cpu() for c in flat.split(DECODE_CHUNK)])
            video = out.reshape(B, T, 3, h * self.spatial, w * self.spatial).permute(0, 2, 1, 3, 4)
        else:
            video = torch.cat([self.module.decode(c).sample.float().cpu() for c in z.split(1)])
        return video.clamp(-1.0, 1.0).contiguous()


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One draw mean + exp(logvar / 2) * eps from a cached posterior (what the official EqM
    training does at every step); eps from ``generator`` for reproducibility."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None else generator.device,
                      dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps


def vae_folder_kind(path: PathLike) -> str:
    """'image' or 'video' for a VAE folder, from its config alone (no weights loaded)."""
    return VAE_CLASSES[read_vae_config(find_vae_folder(path))["_class_name"]]


__all__ = [
    "Vae", "VaeIdentity", "LatentPlan", "load_vae", "latent_timestamps", "plan_latents", "check_num_frames",
    "num_latent_frames", "num_decoded_frames", "sample_posterior", "vae_folder_kind", "config_hash",
    "find_vae_folder", "VAE_CLASSES", "vae_identity",
]
