"""eqm.cache / `eqmctl cache`: tiny diffusers VAEs from disk encode real clips (synthetic and real
video files, one of them variable-rate) into shards; determinism, resume after an interrupt,
unreadable files counted, and a 2-process run that splits the shards."""

import contextlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_vae import save_tiny_kl, save_tiny_wan
from typer.testing import CliRunner

from eqm.cache import LatentDataset, build_cache, read_cache_info
from eqm.errors import EqmError
from eqm.recipe import load_recipe
from eqm.vae import load_vae
from eqmctl.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-synthetic.yaml"
SYNTH = ["data.height=16", "data.width=16", "data.num_frames=4", "data.synthetic.length=12", "vae.batch_size=4"]


def quiet(_line):
    pass


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread(_torch_threads):
    """Encode on one thread, as each rank of the two-process test does (OMP_NUM_THREADS=1). The
    tests compare shard bytes: on two threads, with the machine busy, two builds in one process
    came out one float16 ulp apart; on one thread they match."""
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    return save_tiny_kl(tmp_path_factory.mktemp("vae") / "kl")


@pytest.fixture(scope="module")
def full(kl, tmp_path_factory):
    """An uninterrupted single-process cache of 12 synthetic clips in shards of 5."""
    out = tmp_path_factory.mktemp("full") / "cache"
    with _one_thread():
        build_cache(load_recipe(TINY, SYNTH + [f"vae.path={kl}"]), out, shard_size=5, log=quiet)
    return out


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("shard_*.safetensors"))}


def index(out):
    return [json.loads(line) for line in (Path(out) / "index.jsonl").read_text().splitlines()]


def test_cache_is_deterministic_and_holds_what_training_reads(kl, full, tmp_path):
    from eqm.latent import recipe_dataset

    again = tmp_path / "again"
    res = build_cache(load_recipe(TINY, SYNTH + [f"vae.path={kl}"]), again, shard_size=5, log=quiet)
    assert res.num_clips == 12 and res.shards_written == 3
    assert shard_bytes(again) == shard_bytes(full) and len(shard_bytes(full)) == 3
    entries = index(full)
    assert [e["clip"] for e in entries] == list(range(12))
    assert len({round(e["fps"], 3) for e in entries}) == 12  # every clip at its own rate
    data = LatentDataset(full)
    pixels = recipe_dataset(load_recipe(TINY, SYNTH))
    vae = load_vae(kl)
    for i in (0, 7):
        item, want = data[i], pixels[i]
        torch.testing.assert_close(item["video"], vae.encode(want["video"][None])[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(item["timestamps"], want["timestamps"], atol=1e-6, rtol=0)
        assert item["logvar"].shape == item["video"].shape == (4, 4, 2, 2) and int(item["label"]) == i % 4
        assert entries[i]["source"] == "synthetic" and entries[i]["crop"]["resize"] == [16, 16]
    info = read_cache_info(full)
    assert info["settings"]["vae"]["class_name"] == "AutoencoderKL" and info["posterior"]["mean_std"] > 0


@pytest.mark.parametrize("damage, field", [
    (lambda i: i["settings"].pop("data"), "settings.data"),
    (lambda i: i["settings"]["data"].pop("fps_max"), "settings.data.fps_max"),
    (lambda i: i.pop("latent_shape"), "latent_shape"),
    (lambda i: i.update(temporal="4"), "temporal"),
    (lambda i: i["settings"].update(vae=None), "settings.vae"),
])
def test_a_damaged_cache_json_is_one_error_naming_the_field(full, tmp_path, damage, field):
    import shutil

    from eqm.train import train

    copy = tmp_path / "cache"
    shutil.copytree(full, copy)
    info = json.loads((copy / "cache.json").read_text())
    damage(info)
    (copy / "cache.json").write_text(json.dumps(info))
    with pytest.raises(EqmError, match=re.escape(f"'{field}'")):
        LatentDataset(copy)
    with pytest.raises(EqmError, match=re.escape(f"'{field}'")):
        train(load_recipe(TINY, ["data.source=latents", f"data.latents={copy}", "train.steps=1"]), tmp_path / "run", log=quiet)


def test_interrupted_cache_resumes_without_redoing_finished_shards(kl, full, tmp_path):
    out, lines = tmp_path / "cache", []

    def interrupt_after_first_shard(line):
        lines.append(line)
        if line.startswith("shard 1/"):
            raise KeyboardInterrupt

    rec = load_recipe(TINY, SYNTH + [f"vae.path={kl}"])
    with pytest.raises(KeyboardInterrupt):
        build_cache(rec, out, shard_size=5, log=interrupt_after_first_shard)
    first = (out / "shard_00000.safetensors").stat().st_mtime_ns
    assert not (out / "shard_00001.json").exists()
    with pytest.raises(EqmError, match="incomplete .*rerun the same"):
        LatentDataset(out)
    lines.clear()
    res = build_cache(rec, out, shard_size=5, log=lines.append)
    assert (res.shards_resumed, res.shards_written) == (1, 2)
    assert "resuming: 1 of this process's 3 shards already done" in lines[0]
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == first
    assert shard_bytes(out) == shard_bytes(full) and index(out) == index(full)
    with pytest.raises(EqmError, match="made with other settings"):  # same --out, another recipe
        build_cache(load_recipe(TINY, SYNTH + [f"vae.path={kl}", "train.seed=1"]), out, shard_size=5, log=quiet)


def test_folder_cache_through_a_video_vae_keeps_real_and_vfr_timestamps(tmp_path, monkeypatch):
    from eqm.data.synthetic import SyntheticMotion
    from eqm.video import io as vio
    from eqm.video.io import read_video, write_video

    wan = save_tiny_wan(tmp_path / "wan")
    root = tmp_path / "videos"
    motion = SyntheticMotion(num_classes=2, height=32, width=32)
    motion.write_videos(root, [12, 25], seconds=1.0, per_class=2)
    names = motion.class_names
    pts = np.sort(np.r_[0.0, np.cumsum(np.random.default_rng(0).uniform(0.02, 0.09, 23))])
    frames = np.full((24, 32, 32, 3), 128, dtype=np.uint8)
    write_video(root / names[0] / "vfr.mkv", frames, 25, pts=pts)
    (root / names[1] / "broken.mp4").write_bytes(b"not a video")
    unreadable = root / names[1] / sorted(p.name for p in (root / names[1]).glob("clip_*"))[0]
    real_read = vio.read_clip

    def flaky(path, times, **kw):  # probes fine, fails when decoded
        if Path(path) == unreadable:
            raise EqmError(f"cannot decode video {path}: injected")
        return real_read(path, times, **kw)

    monkeypatch.setattr(vio, "read_clip", flaky)
    rec = load_recipe(TINY, ["data.source=folder", f"data.root={root}", "data.num_frames=9", "data.height=32",
                             "data.width=32", "data.clips_per_file=2", "data.fps_max=25", f"vae.path={wan}"])
    res = build_cache(rec, tmp_path / "cache", shard_size=4, log=quiet, warn=quiet)
    assert (res.num_clips, res.broken_clips, res.broken_files, res.skipped_files) == (8, 2, 1, 1)
    info = read_cache_info(tmp_path / "cache")
    assert info["latent_shape"] == [4, 3, 4, 4] and info["kind"] == "video"
    assert [Path(b["source"]) for b in info["unreadable_clips"]] == [unreadable, unreadable]
    assert "broken.mp4" in info["skipped_files"][0][0]
    vfr = [e for e in index(tmp_path / "cache") if e["source"].endswith("vfr.mkv")]
    assert len(vfr) == 2
    real = read_video(root / names[0] / "vfr.mkv").pts
    for e in vfr:
        ft = np.array(e["frame_timestamps"])
        np.testing.assert_allclose(ft, real[e["frames"]] - real[e["frames"][0]], atol=1e-5)
        np.testing.assert_allclose(e["latent_timestamps"], [ft[0], ft[1:5].mean(), ft[5:9].mean()], atol=1e-5)
    ds = LatentDataset(tmp_path / "cache")
    assert len(ds) == 8 and ds.num_classes == 2 and ds.num_frames == 9 and ds[0]["video"].shape == (4, 3, 4, 4)


def test_cache_cli_errors_are_one_line(kl, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["cache", str(TINY), "--out", str(tmp_path / "c"), *SYNTH])
    assert res.exit_code == 2 and "vae.path is not set" in res.output
    res = runner.invoke(app, ["cache", str(TINY), "--out", str(tmp_path / "c"), *SYNTH, f"vae.path={tmp_path}/none"])
    assert res.exit_code == 2 and "VAE folder not found" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["cache", str(TINY), "--out", str(tmp_path / "c"), *SYNTH, f"vae.path={kl}",
                              "data.num_frames=4", "data.height=20"])
    assert res.exit_code == 2 and "do not fit the VAE" in res.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    res = runner.invoke(app, ["cache", str(TINY), "--out", str(tmp_path / "other"), *SYNTH, f"vae.path={kl}"])
    assert res.exit_code == 2 and "is not a latent cache" in res.output


def test_two_processes_split_the_shards(kl, full, tmp_path):
    from test_train import _launch_two_cpu_ranks

    out = tmp_path / "cache"
    _launch_two_cpu_ranks(["-m", "eqmctl.cli", "cache", str(TINY), "--out", str(out), "--shard-size", "5",
                           *SYNTH, f"vae.path={kl}"], cwd=tmp_path)
    ranks = [json.loads((out / f"shard_{s:05d}.json").read_text())["rank"] for s in range(3)]
    assert ranks == [0, 1, 0]  # shard s on rank s % 2
    assert [e["clip"] for e in index(out)] == list(range(12))  # none lost, none twice
    assert shard_bytes(out) == shard_bytes(full)  # the same shards as one process writes
