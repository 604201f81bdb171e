"""Images from an image checkpoint (T = 1): sample, decode the latents, write PNGs and a grid.

This is `eqmctl sample --ckpt official.pt`: an official EqM checkpoint is an ImageNet image model
in SD-VAE latent space, so a sample is one latent frame (4 x 32 x 32 at 256 px) that the VAE
decodes to pixels.  The sampler is eqm.sampler's GD / NAG-GD; without explicit settings it runs
the paper's (PAPER_SETTINGS, tuned for these models), not the small-model defaults.  Passing
``guidance_channels=3`` guides like the official code (first 3 latent channels only).

Noise is drawn per sample as in eqm.generate (sample i is the same whatever the batch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .errors import EqmError, NonFiniteError

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
    settings: dict = field(default_factory=dict)


@dataclass
class ImageSummary:
    out_dir: Path
    files: list
    grid: Optional[Path]
    manifest: Path


def paper_settings(method: str, steps=None, step_size=None, momentum=None) -> dict:
    """steps / step_size / momentum for an official model: the given ones, else the paper's."""
    from .sampler import PAPER_SETTINGS

    if method not in PAPER_SETTINGS:
        raise EqmError(f"--sampler must be one of {', '.join(PAPER_SETTINGS)}, got {method!r}")
    paper = PAPER_SETTINGS[method]
    return dict(steps=paper["steps"] if steps is None else int(steps),
                step_size=paper["step_size"] if step_size is None else float(step_size),
                momentum=paper["momentum"] if momentum is None else float(momentum))


def check_vae_fits(model, vae) -> None:
    """EqmError unless ``vae`` decodes this model's latents (None: a 3-channel pixel model)."""
    if vae is None:
        if model.config.in_channels != 3:
            raise EqmError(
                f"this model makes {model.config.in_channels}-channel latents: give --vae PATH, the local folder of the "
                "VAE it was trained with (official EqM checkpoints: stabilityai/sd-vae-ft-ema)"
            )
        return
    if vae.kind != "image" or vae.latent_channels != model.config.in_channels:
        raise EqmError(
            f"the VAE at {vae.identity.path} ({vae.describe()}) does not decode this model's "
            f"{model.config.in_channels}-channel image latents"
        )


def generate_images(
    model, *, num_samples: int, labels: Optional[torch.Tensor] = None, cfg_scale: float = 1.0,
    guidance_channels: Optional[int] = None, method: str = "gd", steps: int, step_size: float,
    momentum: float = 0.0, tol: Optional[float] = None, seed: int = 0, batch_size: Optional[int] = None,
    vae=None, dtype: Optional[str] = None, progress: Optional[Callable[[int], None]] = None,
) -> ImageGeneration:
    """Sample ``num_samples`` images (T = 1) with eqm.sampler.sample and decode them with ``vae``;
    ``dtype`` "bf16"/"fp16" runs the model under CUDA autocast (as eqm.generate.generate)."""
    from .generate import _autocast, sample_noise
    from .sampler import sample

    if num_samples < 1 or (batch_size is not None and batch_size < 1):
        raise EqmError(f"--num-samples and --batch-size must be at least 1, got {num_samples} and {batch_size}")
    check_vae_fits(model, vae)
    device = next(model.parameters()).device
    H, W = model.config.input_size
    noise = sample_noise(num_samples, (model.config.in_channels, H, W), seed)
    bs = batch_size or num_samples
    images, latents, evals, rms = [], [], [], []
    for start in range(0, num_samples, bs):
        stop = min(num_samples, start + bs)
        y = None if labels is None else labels[start:stop].to(device)
        with _autocast(device, dtype):
            res = sample(model, noise[start:stop].to(device), None, y, method=method, steps=steps, step_size=step_size,
                         momentum=momentum, cfg_scale=cfg_scale, guidance_channels=guidance_channels, tol=tol)
        x = res.x.float()
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"sampling diverged (non-finite values) with step size {step_size}; try a smaller --step-size")
        latents.append(x.cpu())
        images.append(x.clamp(-1, 1).cpu() if vae is None else vae.decode(x.unsqueeze(2)).squeeze(2))
        evals.append(res.evals.cpu())
        rms.append(res.final_rms.float().cpu())
        if progress is not None:
            progress(stop)
    return ImageGeneration(
        images=torch.cat(images), latents=None if vae is None else torch.cat(latents), labels=labels,
        evals=torch.cat(evals), final_rms=torch.cat(rms),
        settings=dict(method=method, steps=steps, step_size=step_size, momentum=momentum, tol=tol, cfg_scale=cfg_scale,
                      guidance_channels=guidance_channels, seed=seed),
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
        "settings": gen.settings, **(meta or {}),
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
    cfg_scale: float = 1.0, guidance_channels: Optional[int] = None, method: str = "gd", steps=None,
    step_size=None, momentum=None, tol: Optional[float] = None, seed: int = 0, batch_size: Optional[int] = None,
    device="cpu", dtype: Optional[str] = None, grid: bool = True, progress: Optional[Callable[[int], None]] = None,
):
    """What `eqmctl sample --ckpt official.pt` does: load, sample, decode, write.

    Returns ``(summary, generation, loaded)``; ``loaded`` is the eqm.official.LoadedWeights (its
    ``notes`` are remarks for the user).  labels: "207,360" or None (all classes in turn).
    """
    from .generate import parse_labels
    from .official import load_official_model

    model, loaded = load_official_model(ckpt, weights, device=device)
    vae = None
    if vae_path is not None:
        from .vae import load_vae

        vae = load_vae(vae_path, device=device)
    check_vae_fits(model, vae)
    y = parse_labels(labels, model.config.num_classes, num_samples)
    settings = paper_settings(method, steps, step_size, momentum)
    gen = generate_images(model, num_samples=num_samples, labels=y, cfg_scale=cfg_scale if y is not None else 1.0,
                          guidance_channels=guidance_channels, method=method, tol=tol, seed=seed,
                          batch_size=batch_size, vae=vae, dtype=dtype, progress=progress, **settings)
    meta = {"checkpoint": str(ckpt), "weights": loaded.weights, "args": {k: str(v) for k, v in loaded.args.items()},
            "vae": None if vae is None else vae.identity.to_dict()}
    return write_images(gen, out_dir, grid=grid, meta=meta), gen, loaded
