"""The latent space a model works in: which VAE, how clips become model inputs, how samples decode.

A run in latent space records its VAE in every checkpoint (:meth:`LatentSpace.record`: identity,
kind, compression); sampling, previews and retiming decode with that VAE, loaded from the recorded
folder or one given instead (``--vae``), which must hold the same VAE (class and config hash).

Two ways to train in latent space (docs/latent.md):

* from a cache (``data.source: latents``): each batch holds the posterior mean and log-variance,
  and a sample ``mean + std * eps`` is drawn at every step, as the official EqM training does;
* on the fly (``vae.path`` with a pixel source): each batch is encoded by the VAE in the training
  process, then sampled the same way. Slower (benchmarks/bench_latent.py), no cache to write.

Either way the timestamps the model sees are the latent frames' (eqm.vae.latent_timestamps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .errors import EqmError, ParamError
from .recipe import Recipe
from .vae import Vae, VaeIdentity, load_vae, sample_posterior, vae_identity


@dataclass
class LatentSpace:
    """A VAE's latent space: identity and geometry, and the VAE itself once loaded."""

    identity: VaeIdentity
    kind: str
    temporal: int
    spatial: int
    channels: int
    encode_on_the_fly: bool = False
    _vae: Optional[Vae] = field(default=None, repr=False)

    @classmethod
    def of(cls, vae: Vae, encode_on_the_fly: bool = False) -> "LatentSpace":
        return cls(vae.identity, vae.kind, vae.temporal, vae.spatial, vae.latent_channels, encode_on_the_fly, vae)

    def record(self) -> dict:
        """What a checkpoint stores to decode its samples later."""
        return {**self.identity.to_dict(), "kind": self.kind, "temporal": self.temporal, "spatial": self.spatial,
                "latent_channels": self.channels}

    @classmethod
    def from_record(cls, rec: dict, where: str = "checkpoint") -> "LatentSpace":
        try:
            return cls(VaeIdentity.from_dict(rec, where), str(rec["kind"]), int(rec["temporal"]), int(rec["spatial"]),
                       int(rec["latent_channels"]))
        except (KeyError, TypeError, ValueError):
            raise EqmError(f"{where}: the recorded VAE is incomplete (needs kind, temporal, spatial, latent_channels)") from None

    def vae(self, path=None, device="cpu", dtype: Optional[torch.dtype] = None) -> Vae:
        """The VAE, loaded once from ``path`` (default: where it was recorded) and checked to be the
        same VAE (class and config hash) as the one the latents were made with."""
        if self._vae is not None and path is None:
            return self._vae
        where = path if path is not None else self.identity.path
        found = vae_identity(where)
        if not found.matches(self.identity):
            raise EqmError(f"the VAE in {where} ({found.describe()}) is not the one these latents were made with "
                           f"({self.identity.describe()})")
        self._vae = load_vae(where, device, dtype)
        return self._vae

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> video (B, 3, T, H, W) in [-1, 1] with the loaded VAE (see :meth:`vae`)."""
        if self._vae is None:
            raise EqmError("the VAE is not loaded: call LatentSpace.vae(path) first")
        return self._vae.decode(latents)


def checkpoint_vae(state: dict, path=None, device="cpu", where: str = "checkpoint") -> Optional[Vae]:
    """The VAE that decodes a checkpoint's samples (state.json's "vae"), loaded from ``path`` (e.g.
    --vae) or the recorded folder; None for a pixel model (EqmError if a path was given for one)."""
    rec = state.get("vae")
    if not rec:
        if path is not None:
            raise ParamError("vae", f"vae does not apply: {where} is a pixel-space model (trained without a VAE)")
        return None
    return LatentSpace.from_record(rec, where).vae(path, device)


def cache_space(dataset, recipe: Recipe) -> LatentSpace:
    """The latent space of a cache dataset; EqmError when the recipe names another VAE."""
    info = dataset.info
    ident = dataset.identity
    if recipe.vae.path:
        mine = vae_identity(recipe.vae.path)
        if not mine.matches(ident):
            raise EqmError(f"vae.path {recipe.vae.path} holds {mine.describe()} but the cache {dataset.path} was "
                           f"made with {ident.describe()}; use that VAE or re-cache")
    return LatentSpace(ident, str(info["kind"]), int(info["temporal"]), int(info["spatial"]), int(info["latent_shape"][0]))


def training_space(recipe: Recipe, dataset, device="cpu") -> Optional[LatentSpace]:
    """The latent space a recipe trains in: the cache's (data.source latents), vae.path's encoded
    on the fly (a pixel source with vae.path), or None (pixels)."""
    if recipe.data.source == "latents":
        return cache_space(dataset, recipe)
    if not recipe.vae.path:
        return None
    from .cache import check_clip_fits, recipe_vae

    vae = recipe_vae(recipe, device)
    check_clip_fits(recipe, vae)
    return LatentSpace.of(vae, encode_on_the_fly=True)


def recipe_dataset(recipe: Recipe, seed: Optional[int] = None, warn: Optional[Callable[[str], None]] = None):
    """The dataset a recipe trains on: its pixel source (eqm.data.clips.dataset_from_config) or,
    for data.source latents, the latent cache, whose clip settings then replace the recipe's.
    ``seed`` defaults to train.seed; ``warn`` gets the data warnings (skipped files, settings the
    cache replaced) as one line each."""
    from .data.clips import dataset_from_config

    if recipe.data.source == "latents":
        from .cache import LatentDataset

        dataset = LatentDataset(recipe.data.latents)
        changed = adopt_cache_clip_shape(recipe, dataset)
        if changed and warn is not None:
            warn(f"clip settings from the cache {recipe.data.latents} replace the recipe's: {', '.join(changed)}")
        return dataset
    return dataset_from_config(recipe.data, recipe.train.seed if seed is None else seed, warn)


def adopt_cache_clip_shape(recipe: Recipe, dataset) -> list[str]:
    """With data.source latents, the clip settings are the cache's: copy its frames, rates and
    frame size into ``recipe.data`` so the run's resolved recipe (trained span, previews) tells
    the truth. Returns "key: recipe -> cache" for each value that changed."""
    made = dataset.info["settings"]["data"]
    changed = []
    for key in ("num_frames", "fps_min", "fps_max", "height", "width"):
        if getattr(recipe.data, key) != made[key]:
            changed.append(f"data.{key} {getattr(recipe.data, key):g} -> {made[key]:g}")
        setattr(recipe.data, key, made[key])
    return changed


def model_input_shape(recipe: Recipe, space: Optional[LatentSpace], dataset) -> tuple[int, int, int, int]:
    """(C, T, H, W) the model sees: pixels, the cache's latents, or the VAE's latents of the clips."""
    d = recipe.data
    if space is None:
        return (3, d.num_frames, d.height, d.width)
    if recipe.data.source == "latents":
        return tuple(dataset.latent_shape)
    return space.vae().latent_shape(d.num_frames, d.height, d.width)


def model_batch(space: Optional[LatentSpace], batch: dict, device, generator: torch.Generator):
    """(x, timestamps) the model trains on from a loader batch: pixels as they are; cached
    moments -> one posterior sample; pixels with an on-the-fly VAE -> encoded, then sampled, with
    latent timestamps. ``generator`` (on ``device``) draws the posterior noise."""
    x = batch["video"].to(device, non_blocking=True)
    ts = batch["timestamps"].to(device, dtype=torch.float32, non_blocking=True)
    if space is None:
        return x, ts
    if "logvar" in batch:
        return sample_posterior(x, batch["logvar"].to(device, non_blocking=True), generator), ts
    vae = space.vae()
    mean, logvar = vae.encode_moments(x)
    return sample_posterior(mean.to(device), logvar.to(device), generator), vae.latent_timestamps(ts)


__all__ = ["LatentSpace", "checkpoint_vae", "training_space", "cache_space", "model_input_shape", "model_batch", "adopt_cache_clip_shape"]
