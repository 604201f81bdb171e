"""Images from an image checkpoint (T = 1): sample, decode the latents, write PNGs and a grid.

This is `eqmctl sample --ckpt official.pt`: an official EqM checkpoint is an ImageNet image model
in SD-VAE latent space, so a sample is one latent frame (4 x 32 x 32 at 256 px) that the VAE
decodes to pixels.  The sampler is eqm.sampler's GD / NAG-GD; without explicit settings it runs
the paper's (eqm.config.PAPER_SETTINGS, tuned for these models), not the small-model defaults.  Passing
``guidance_channels=3`` guides like the official code (first 3 latent channels only).

Noise is drawn per sample as in eqm.generate (sample i is the same whatever the batch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .config import PAPER_SETTINGS, SamplerSettings
from .errors import EqmError, NonFiniteError, ParamError

#: Most images per grid row.
GRID_COLUMNS = 8


@dataclass
class ImageGeneration:
    """images: (N, 3, H, W) float32 in [-1, 1] on the CPU; latents: (N, C, h, w) the sampler's
    output (None for a pixel model); labels: (N,) or None; evals / final_rms per sample."""

    images: torch.Tensor
    latents: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    evals: torch.Tensor
    final_rms: torch.Tensor
    settings: SamplerSettings = field(default_factory=lambda: SamplerSettings().resolved(PAPER_SETTINGS))
    seed: int = 0


@dataclass
class ImageSummary:
    out_dir: Path
    files: list
    grid: Optional[Path]
    manifest: Path


def check_vae_fits(model, vae) -> None:
    """EqmError unless ``vae`` decodes this model's latents (None: a 3-channel pixel model)."""
    if vae is None:
        if model.config.in_channels != 3:
            raise ParamError(
                "vae", f"vae is needed: this model makes {model.config.in_channels}-channel latents; give the local "
                "folder of the VAE it was trained with (official EqM checkpoints: stabilityai/sd-vae-ft-ema)"
            )
        return
    if vae.kind != "image" or vae.latent_channels != model.config.in_channels:
        raise EqmError(
            f"the VAE at {vae.identity.path} ({vae.describe()}) does not decode this model's "
            f"{model.config.in_channels}-channel image latents"
        )


def generate_images(
    model, *, num_samples: int, labels: Optional[torch.Tensor] = None, settings: Optional[SamplerSettings] = None,
    seed: int = 0, batch_size: Optional[int] = None, vae=None, dtype: Optional[str] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> ImageGeneration:
    """Sample ``num_samples`` images (T = 1) with eqm.sampler.sample and decode them with ``vae``;
    settings not chosen take the paper's (PAPER_SETTINGS); ``dtype`` "bf16"/"fp16" runs the model
    under CUDA autocast (as eqm.generate.generate)."""
    from .generate import _autocast, _check_work, check_batch_options, sample_noise
    from .sampler import sample

    settings = (settings or SamplerSettings()).resolved(PAPER_SETTINGS)
    check_batch_options(num_samples, batch_size)
    check_vae_fits(model, vae)
    device = next(model.parameters()).device
    bs = batch_size or num_samples
    # before the noise is drawn: a batch that cannot fit is refused with its estimate
    _check_work(model, 1, min(bs, num_samples), device, settings)
    H, W = model.config.input_size
    noise = sample_noise(num_samples, (model.config.in_channels, H, W), seed)
    images, latents, evals, rms = [], [], [], []
    for start in range(0, num_samples, bs):
        stop = min(num_samples, start + bs)
        y = None if labels is None else labels[start:stop].to(device)
        with _autocast(device, dtype):
            res = sample(model, noise[start:stop].to(device), None, y, settings)
        x = res.x.float()
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"sampling diverged (non-finite values) with step_size {settings.step_size}; try a smaller step_size")
        latents.append(x.cpu())
        images.append(x.clamp(-1, 1).cpu() if vae is None else vae.decode(x.unsqueeze(2)).squeeze(2))
        evals.append(res.evals.cpu())
        rms.append(res.final_rms.float().cpu())
        if progress is not None:
            progress(stop)
    return ImageGeneration(
        images=torch.cat(images), latents=None if vae is None else torch.cat(latents), labels=labels,
        evals=torch.cat(evals), final_rms=torch.cat(rms), settings=settings, seed=seed,
    )


def grid_rows(images: torch.Tensor, columns: int = GRID_COLUMNS) -> list:
    """(N, 3, H, W) -> rows of at most ``columns`` images, each (3, k, H, W), for write_grid_png."""
    n = images.shape[0]
    cols = min(columns, max(1, math.ceil(math.sqrt(n))))
    return [images[i:i + cols].permute(1, 0, 2, 3) for i in range(0, n, cols)]


def write_images(gen: ImageGeneration, out_dir, *, prefix: str = "image", grid: bool = True,
                 class_names: Sequence[str] = (), meta: Optional[dict] = None) -> ImageSummary:
    """``<prefix>_00000.png`` ... one per image, ``<prefix>_grid.png`` and ``<prefix>s.json``
    (settings, label, evaluations per image); every file written atomically."""
    from . import fsio
    from .video.io import write_grid_png, write_png_frames

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EqmError(f"output path {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_png_frames(out_dir, gen.images.permute(1, 0, 2, 3), prefix=f"{prefix}_")
    grid_path = write_grid_png(out_dir / f"{prefix}_grid.png", grid_rows(gen.images)) if grid else None
    labels = [None] * len(files) if gen.labels is None else [int(v) for v in gen.labels]
    doc = {
        "settings": {**gen.settings.to_dict(), "seed": gen.seed}, **(meta or {}),
        "images": [{"file": f.name, "label": lab,
                    "class": class_names[lab] if lab is not None and lab < len(class_names) else None,
                    "evals": int(e), "final_rms": float(r)}
                   for f, lab, e, r in zip(files, labels, gen.evals, gen.final_rms)],
        "grid": None if grid_path is None else grid_path.name,
    }
    manifest = out_dir / f"{prefix}s.json"
    fsio.write_json(manifest, doc)
    return ImageSummary(out_dir=out_dir, files=files, grid=grid_path, manifest=manifest)


def sample_official(
    ckpt, out_dir, *, weights: str = "ema", vae_path=None, num_samples: int = 8, labels: Optional[str] = None,
    settings: Optional[SamplerSettings] = None, seed: int = 0, batch_size: Optional[int] = None,
    device="cpu", dtype: Optional[str] = None, grid: bool = True, progress: Optional[Callable[[int], None]] = None,
):
    """What `eqmctl sample --ckpt official.pt` does: load, sample, decode, write.

    Returns ``(summary, generation, loaded)``; ``loaded`` is the eqm.official.LoadedWeights (its
    ``notes`` are remarks for the user).  labels: "207,360" or None (all classes in turn).
    settings: the sampler; what is not chosen takes the paper's settings, guidance 1.
    """
    from .generate import check_batch_options, check_output_options, parse_labels
    from .official import load_official_model

    check_output_options(out_dir)  # before the (large) checkpoint is read and sampled
    check_batch_options(num_samples, batch_size)
    model, loaded = load_official_model(ckpt, weights, device=device)
    vae = None
    if vae_path is not None:
        from .vae import load_vae

        vae = load_vae(vae_path, device=device)
    check_vae_fits(model, vae)
    y = parse_labels(labels, model.config.num_classes, num_samples)
    settings = (settings or SamplerSettings()).with_default_guidance(1.0)
    if y is None:
        settings = replace(settings, cfg_scale=1.0)  # an unconditional model has nothing to guide
    gen = generate_images(model, num_samples=num_samples, labels=y, settings=settings, seed=seed,
                          batch_size=batch_size, vae=vae, dtype=dtype, progress=progress)
    meta = {"checkpoint": str(ckpt), "weights": loaded.weights, "args": {k: str(v) for k, v in loaded.args.items()},
            "vae": None if vae is None else vae.identity.to_dict()}
    return write_images(gen, out_dir, grid=grid, meta=meta), gen, loaded
