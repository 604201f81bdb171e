"""The latent cache: a recipe's clips encoded once by its VAE, stored as safetensors shards.

``build_cache(recipe, out)`` (``eqmctl cache``) reads clip i of the recipe's dataset exactly as
training would (rate drawn by the clip policy, real timestamps, crop), encodes it and stores the
VAE posterior's mean and log-variance, normalised, in float16. Layout of ``out``:

* ``cache.json``: format, the settings the cache was made with (data section, seed, shard size,
  VAE identity), the latent shape, class names, and once complete the counts;
* ``shard_NNNNN.safetensors``: ``mean``, ``logvar`` (n, C, T', h, w), ``label`` (n,),
  ``timestamps`` (n, T') latent timestamps; the VAE identity in its metadata;
* ``shard_NNNNN.json``: written after its tensors, so it marks the shard done: per clip its dataset
  index, row, source file, label, effective fps, real timestamps of the source and latent frames,
  crop; and the clips whose file could not be read;
* ``index.jsonl``: all clip entries in dataset order, written when every shard is done.

Shard s holds dataset items [s*S, (s+1)*S); under ``accelerate launch`` rank r encodes the shards
with s % world == r, so no clip is lost or duplicated and the shards are identical whatever the
number of processes. A rerun skips shards whose json exists (resume after an interrupt), and a
cache directory made with other settings is refused. Why mean and log-variance: docs/latent.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from . import fsio
from .distributed import before_process_group
from .errors import EqmError, ParamError
from .jsonio import dumps
from .recipe import Recipe
from .timebase import format_eta
from .vae import Vae, VaeIdentity, load_vae, num_decoded_frames

PathLike = Union[str, Path]
FORMAT = 1
CACHE_FILE = "cache.json"
INDEX_FILE = "index.jsonl"
#: Clips per shard: ~2 MB of float16 moments per shard for 16 x 4 x 32 x 32 SD-VAE latents.
DEFAULT_SHARD_SIZE = 64
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shard_name(s: int) -> str:
    return f"shard_{s:05d}"


def vae_dtype(recipe: Recipe) -> torch.dtype:
    """vae.dtype as a torch dtype, float32 on the CPU (half-precision convolutions there are slow)."""
    return _DTYPES[recipe.vae.dtype] if torch.cuda.is_available() else torch.float32


def recipe_vae(recipe: Recipe, device="cpu") -> Vae:
    """The recipe's VAE (vae.path), loaded in vae.dtype; EqmError when vae.path is not set."""
    if not recipe.vae.path:
        raise EqmError("vae.path is not set: latents need a VAE (vae.path=FOLDER, a local diffusers VAE folder)")
    return load_vae(recipe.vae.path, device, vae_dtype(recipe))


def check_clip_fits(recipe: Recipe, vae: Vae) -> tuple:
    """The latent shape (C, T', h, w) of the recipe's clips; EqmError naming the data key that
    breaks the VAE's frame or size rule."""
    d = recipe.data
    try:
        return vae.latent_shape(d.num_frames, d.height, d.width)
    except EqmError as e:
        raise EqmError(f"data.num_frames / data.height / data.width do not fit the VAE: {e}") from None


def cache_settings(recipe: Recipe, vae: Vae, shard_size: int) -> dict:
    """What makes two cache runs produce the same shards (compared on resume)."""
    data = {k: v for k, v in recipe.to_dict()["data"].items() if k not in ("num_workers", "latents")}
    return {"data": data, "seed": recipe.train.seed, "shard_size": shard_size, "vae": vae.identity.to_dict()}


def _same_settings(a: dict, b: dict) -> bool:
    strip = lambda s: {**s, "vae": None}  # noqa: E731 - the VAE compares by identity, not path
    return strip(a) == strip(b) and VaeIdentity.from_dict(a["vae"]).matches(VaeIdentity.from_dict(b["vae"]))


# ============================================================================================
# Building
# ============================================================================================


@dataclass
class CacheResult:
    """What a cache run did: clips cached / unreadable, shards written now / found done."""

    out: Path
    num_clips: int
    broken_clips: int
    broken_files: int
    skipped_files: int
    shards_written: int
    shards_resumed: int
    elapsed: float
    world_size: int
    clips_per_s: float  # this process's read + encode + write rate over the shards it encoded (0 if none)


class _Items(torch.utils.data.Dataset):
    """Dataset items ``indices`` read strictly from their own file: (i, item, info) or (i, None, reason)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)
        self.bad: dict[str, str] = {}

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        try:
            item, info = self.dataset.read_with_info(i)
            return i, item, info
        except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the cache
            return i, None, e if isinstance(e, EqmError) else f"{type(e).__name__}: {e}"


def _source_of(dataset, i: int) -> str:
    sources = getattr(dataset, "sources", None)
    return sources[i % len(sources)].path if sources else "synthetic"


def _encode_shard(dataset, vae: Vae, indices, batch_size: int, num_workers: int) -> tuple[dict, list, list]:
    """Read and encode one shard's clips: (tensors, clip entries, broken entries)."""
    loader = torch.utils.data.DataLoader(_Items(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=list)
    means, logvars, labels, lts, entries, broken = [], [], [], [], [], []
    for batch in loader:
        ok = [(i, item, info) for i, item, info in batch if item is not None]
        broken += [{"clip": int(i), "source": _source_of(dataset, i), "reason": str(why)}
                   for i, item, why in batch if item is None]
        if not ok:
            continue
        video = torch.stack([item["video"] for _, item, _ in ok])
        mean, logvar = vae.encode_moments(video)
        means.append(mean.half().cpu())
        logvars.append(logvar.half().cpu())
        for i, item, info in ok:
            ts = item["timestamps"].double()
            lt = vae.latent_timestamps(ts)
            labels.append(int(item["label"]))
            lts.append(lt.float())
            entries.append({"clip": int(i), "row": len(entries), **info, "label": int(item["label"]),
                            "fps": float(item["fps"]), "frame_timestamps": [round(float(t), 6) for t in ts],
                            "latent_timestamps": [round(float(t), 6) for t in lt]})
    tensors = {}
    if entries:
        tensors = {"mean": torch.cat(means), "logvar": torch.cat(logvars),
                   "label": torch.tensor(labels, dtype=torch.long), "timestamps": torch.stack(lts)}
    return tensors, entries, broken


def _posterior_stats(tensors: dict) -> dict:
    """Sums for the cache's report: mean posterior std and spread of the means (normalised units)."""
    if not tensors:
        return {"n": 0, "std_sum": 0.0, "mean_sq_sum": 0.0, "mean_sum": 0.0}
    m, lv = tensors["mean"].float(), tensors["logvar"].float()
    return {"n": m.numel(), "std_sum": float(torch.exp(0.5 * lv).sum()), "mean_sum": float(m.sum()),
            "mean_sq_sum": float((m * m).sum())}


def _write_shard(out: Path, s: int, tensors: dict, entries: list, broken: list, vae: Vae, rank: int) -> None:
    from safetensors.torch import save

    name = shard_name(s)
    if tensors:
        # one metadata key: safetensors orders several in a hash map, and equal shards should be equal bytes
        meta = {"eqm_latents": json.dumps({"format": FORMAT, "vae": vae.identity.to_dict()}, sort_keys=True)}
        fsio.write_bytes(out / f"{name}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}, meta))
    fsio.write_json(out / f"{name}.json", {
        "shard": s, "rank": rank, "file": f"{name}.safetensors" if tensors else None,
        "clips": entries, "broken": broken, "stats": _posterior_stats(tensors),
    })


def _prepare_out(out: Path, settings: dict, header: dict) -> None:
    """Create ``out`` or check that the cache already there was made with the same settings."""
    path = out / CACHE_FILE
    if path.is_file():
        try:
            have = json.loads(path.read_text())
            same = have.get("format") == FORMAT and _same_settings(have["settings"], settings)
        except (json.JSONDecodeError, KeyError, TypeError, EqmError):
            raise EqmError(f"{path} is not a latent cache's description; choose another output folder (out)") from None
        if not same:
            raise EqmError(f"{out} holds a latent cache made with other settings (recipe data section, seed, "
                           f"shard size or VAE); choose another output folder or delete it")
        return
    if out.exists() and any(out.iterdir()):
        raise ParamError("out", f"out {out} exists and is not a latent cache; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    fsio.write_json(path, {"format": FORMAT, "complete": False, "settings": settings, **header})


def _clean_temps(out: Path) -> None:
    for p in out.glob(".shard_*.tmp-*"):
        p.unlink(missing_ok=True)


def build_cache(recipe: Recipe, out: PathLike, *, shard_size: int = DEFAULT_SHARD_SIZE,
                log: Optional[Callable[[str], None]] = None,
                warn: Optional[Callable[[str], None]] = None) -> CacheResult:
    """Encode the recipe's dataset (data section, seed, vae.path) into a latent cache at ``out``.

    Works in one process or under ``accelerate launch`` (ranks split the shards); rerunning the
    same command resumes, skipping finished shards. Only the main process logs and writes the
    index. Returns a :class:`CacheResult` (on every rank; counts are global).
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ParamError("shard_size", f"shard_size must be a positive number of clips, got {shard_size!r}")
    t0 = time.time()
    out = Path(out)
    before_process_group()
    vae = recipe_vae(recipe, "cpu")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    log = (log or print) if main else (lambda _m: None)
    warn = warn if main else (lambda _m: None)
    vae.module.to(acc.device)
    shape = check_clip_fits(recipe, vae)
    dataset = _pixel_dataset(recipe, warn)
    settings = cache_settings(recipe, vae, shard_size)
    num_shards = -(-len(dataset) // shard_size)
    header = {"latent_shape": list(shape), "num_frames": recipe.data.num_frames,
              "frame_size": [recipe.data.height, recipe.data.width], "temporal": vae.temporal,
              "spatial": vae.spatial, "kind": vae.kind, "num_items": len(dataset), "num_shards": num_shards,
              "class_names": list(getattr(dataset, "class_names", []) or []),
              "num_classes": int(getattr(dataset, "num_classes", 0) or 0),
              "skipped_files": [list(x) for x in getattr(dataset, "skipped_files", [])]}
    error: list = [None]
    if main:
        try:
            _prepare_out(out, settings, header)
            _clean_temps(out)
        except EqmError as e:
            error = [str(e)]
    if world > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        raise EqmError(error[0])

    mine = [s for s in range(rank, num_shards, world)]
    todo = [s for s in mine if not (out / f"{shard_name(s)}.json").is_file()]
    log(f"cache {out}: {len(dataset)} clips in {num_shards} shards of {shard_size}, {vae.describe()}, "
        f"latents {'x'.join(map(str, shape))}, {world} process(es)"
        + (f"; resuming: {len(mine) - len(todo)} of this process's {len(mine)} shards already done"
           if len(todo) < len(mine) else ""))
    rate = _encode_shards(dataset, vae, todo, out, recipe, shard_size, rank, world, log)
    acc.wait_for_everyone()
    result = [None]
    if main:
        result = [_finish(out, num_shards)]
    if world > 1:
        broadcast_object_list(result)
    clips, broken, broken_files = result[0]
    if main:
        log(f"cache done: {clips} clips in {out}" + (f", {broken} clips of {broken_files} unreadable files skipped"
                                                      if broken else "")
            + (f", {len(header['skipped_files'])} files skipped when probing" if header["skipped_files"] else ""))
    return CacheResult(out=out, num_clips=clips, broken_clips=broken, broken_files=broken_files,
                       skipped_files=len(header["skipped_files"]), shards_written=len(todo),
                       shards_resumed=len(mine) - len(todo), elapsed=time.time() - t0, world_size=world,
                       clips_per_s=rate)


def _pixel_dataset(recipe: Recipe, warn):
    from .data.clips import dataset_from_config

    if recipe.data.source == "latents":
        raise EqmError("data.source is latents: a cache is made from pixels (synthetic, folder or manifest)")
    return dataset_from_config(recipe.data, recipe.train.seed, warn)


def _encode_shards(dataset, vae, todo, out, recipe, shard_size, rank, world, log) -> float:
    """Encode this process's unfinished shards, logging clips/s and an ETA after each; returns clips/s."""
    t0, done, rate = time.time(), 0, 0.0
    for k, s in enumerate(todo):
        indices = range(s * shard_size, min(len(dataset), (s + 1) * shard_size))
        tensors, entries, broken = _encode_shard(dataset, vae, indices, recipe.vae.batch_size, recipe.data.num_workers)
        _write_shard(out, s, tensors, entries, broken, vae, rank)
        done += len(indices)
        rate = done / max(time.time() - t0, 1e-9)
        left = sum(min(len(dataset), (x + 1) * shard_size) - x * shard_size for x in todo[k + 1:])
        log(f"shard {k + 1}/{len(todo)}" + (f" (process 0 of {world})" if world > 1 else "")
            + f": {done} clips, {rate:.1f} clips/s, eta {format_eta(left / max(rate, 1e-9))}"
            + (f", {len(broken)} unreadable" if broken else ""))
    return rate


def _finish(out: Path, num_shards: int) -> tuple[int, int, int]:
    """Merge the shard jsons into index.jsonl and mark cache.json complete: (clips, broken clips, broken files)."""
    entries, broken, stats = [], [], {"n": 0, "std_sum": 0.0, "mean_sum": 0.0, "mean_sq_sum": 0.0}
    for s in range(num_shards):
        path = out / f"{shard_name(s)}.json"
        if not path.is_file():
            raise EqmError(f"cache {out}: {path.name} is missing after every process finished", exit_code=1)
        part = json.loads(path.read_text())
        entries += [{**e, "shard": part["file"]} for e in part["clips"]]
        broken += part["broken"]
        for k in stats:
            stats[k] += part["stats"][k]
    entries.sort(key=lambda e: e["clip"])
    fsio.write_bytes(out / INDEX_FILE, "".join(dumps(e) + "\n" for e in entries).encode())
    desc = json.loads((out / CACHE_FILE).read_text())
    n = max(stats["n"], 1)
    spread = max(stats["mean_sq_sum"] / n - (stats["mean_sum"] / n) ** 2, 0.0) ** 0.5
    desc.update(complete=True, num_clips=len(entries), unreadable_clips=broken,
                broken_files=sorted({b["source"] for b in broken}),
                posterior={"mean_std": stats["std_sum"] / n, "latent_std": spread})
    fsio.write_json(out / CACHE_FILE, desc)
    return len(entries), len(broken), len({b["source"] for b in broken})


# ============================================================================================
# Reading
# ============================================================================================


def read_cache_info(path: PathLike) -> dict:
    """cache.json of a complete cache (EqmError naming the directory otherwise)."""
    d = Path(path)
    f = d / CACHE_FILE
    if not f.is_file():
        raise EqmError(f"latent cache not found: {d} has no {CACHE_FILE} (data.latents; write one with `eqmctl cache`)")
    try:
        info = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EqmError(f"cannot read {f}: {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise EqmError(f"{f}: not a latent cache of format {FORMAT}")
    if not info.get("complete"):
        raise EqmError(f"latent cache {d} is incomplete (interrupted?): rerun the same `eqmctl cache` command to finish it")
    _check_info(info, f)
    return info


def _check_info(info: dict, f: Path) -> None:
    """The fields training reads from cache.json are there with usable types (a one-line EqmError
    naming the field otherwise, never a KeyError deep in training)."""
    def bad(field: str, what: str):
        raise EqmError(f"{f}: '{field}' {what}; the file is damaged or was not written by `eqmctl cache`")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    def count(v) -> bool:
        return isinstance(v, int) and number(v)

    settings = info.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("vae"), dict):
        bad("settings.vae", "is missing")
    data = settings.get("data")
    if not isinstance(data, dict):
        bad("settings.data", "is missing")
    for key in ("num_frames", "fps_min", "fps_max", "height", "width"):
        if not number(data.get(key)):
            bad(f"settings.data.{key}", "is missing or not a positive number")
    shape = info.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(count(v) for v in shape)):
        bad("latent_shape", "is not four positive integers")
    if not count(info.get("temporal")):
        bad("temporal", "is not a positive integer")


class LatentDataset(torch.utils.data.Dataset):
    """Clips of a latent cache: {"video": mean (C, T', h, w), "logvar": same shape, "timestamps":
    (T',) latent timestamps, "label", "fps"}, float32. Training draws a posterior sample from
    mean and logvar at every step (eqm.vae.sample_posterior)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.info = read_cache_info(self.path)
        self.identity = VaeIdentity.from_dict(self.info["settings"]["vae"], f"{self.path / CACHE_FILE}")
        self.latent_shape = tuple(int(v) for v in self.info["latent_shape"])
        self.class_names = list(self.info.get("class_names") or [])
        self.num_classes = int(self.info.get("num_classes") or 0)
        self.skipped = len(self.info.get("skipped_files") or []) + len(self.info.get("broken_files") or [])
        self.skipped_files = [tuple(x) for x in self.info.get("skipped_files") or []]
        self.entries = self._read_index()
        if not self.entries:
            raise EqmError(f"latent cache {self.path} holds no clips")
        self._files: dict = {}

    def _read_index(self) -> list[dict]:
        f = self.path / INDEX_FILE
        entries = []
        try:
            with open(f) as fh:
                for n, line in enumerate(fh, 1):
                    e = json.loads(line)
                    if len(e.get("latent_timestamps", ())) != self.latent_shape[1] or not e.get("shard"):
                        raise EqmError(f"{f} line {n}: latent timestamps do not match the cache's shape")
                    entries.append(e)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise EqmError(f"cannot read the index {f}: {e}") from None
        return entries

    @property
    def num_frames(self) -> int:
        """Source frames per clip (what a latent clip decodes to)."""
        return num_decoded_frames(self.latent_shape[1], int(self.info["temporal"]))

    def __len__(self) -> int:
        return len(self.entries)

    def _shard(self, name: str):
        from safetensors import safe_open

        f = self._files.get(name)
        if f is None:
            path = self.path / name
            try:
                f = self._files[name] = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
                raise EqmError(f"cannot open latent shard {path}: {e}") from None
        return f

    def __getitem__(self, index) -> dict:
        e = self.entries[int(index)]
        f = self._shard(e["shard"])
        row = int(e["row"])
        mean, logvar = f.get_slice("mean")[row:row + 1], f.get_slice("logvar")[row:row + 1]
        if tuple(mean.shape[1:]) != self.latent_shape:
            raise EqmError(f"{self.path / e['shard']}: latents of shape {tuple(mean.shape[1:])}, the cache says "
                           f"{self.latent_shape}")
        return {"video": mean[0].float(), "logvar": logvar[0].float(),
                "timestamps": torch.tensor(e["latent_timestamps"], dtype=torch.float32),
                "label": torch.tensor(int(e["label"]), dtype=torch.long), "fps": float(e["fps"])}


__all__ = ["build_cache", "CacheResult", "LatentDataset", "read_cache_info", "recipe_vae", "check_clip_fits",
           "cache_settings", "DEFAULT_SHARD_SIZE", "shard_name", "vae_dtype"]
