"""Training, previews and sampling in latent space: a tiny SD-VAE-like VAE from disk, a cache of
synthetic clips, a few real steps from the cache and on the fly (tiny Wan-like video VAE), and
samples decoded to MP4s whose rate and frame count PyAV reads back."""

import json
from pathlib import Path

import pytest
from tiny_vae import save_tiny_kl, save_tiny_wan
from typer.testing import CliRunner

from eqm.cache import build_cache
from eqm.recipe import load_recipe
from eqm.video.io import read_video
from eqmctl.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-synthetic.yaml"
PIXELS = ["data.height=32", "data.width=32", "data.num_frames=5", "data.synthetic.length=8", "vae.batch_size=8"]
FAST = ["model.patch_size=2", "model.depth=2", "train.batch_size=4", "train.log_every=1", "train.warmup_steps=0",
        "train.lr=1e-3", "train.lr_schedule=constant", "train.steps=2", "train.preview_every=2",
        "train.preview_frames=6", "train.preview_samples=2", "sample.steps=3"]
runner = CliRunner()


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    return save_tiny_kl(root / "kl"), save_tiny_wan(root / "wan")


@pytest.fixture(scope="module")
def cache(vaes, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(load_recipe(TINY, PIXELS + [f"vae.path={vaes[0]}"]), out, shard_size=4, log=lambda _l: None)
    return out


@pytest.fixture(scope="module")
def cache_run(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "latent"
    res = runner.invoke(app, ["train", str(TINY), *FAST, "data.source=latents", f"data.latents={cache}",
                              "--run-dir", str(run)])
    assert res.exit_code == 0, res.output
    assert "clip settings from the cache" in res.output and "data.height 16 -> 32" in res.output
    return run


def state_of(run):
    return json.loads(next(Path(run, "checkpoints").glob("step_*/state.json")).read_text())


def test_training_from_the_cache_takes_the_latent_shape_and_records_the_vae(cache_run, vaes):
    state = state_of(cache_run)
    arch = state["arch"]
    assert (arch["in_channels"], arch["input_size"], arch["num_frames"]) == (4, [4, 4], 5)
    assert state["vae"]["class_name"] == "AutoencoderKL" and state["vae"]["path"] == str(vaes[0].resolve())
    assert state["recipe"]["data"]["height"] == 32  # the cache's clip settings, not the recipe file's 16
    preview = read_video(next(Path(cache_run, "previews").glob("*.mp4")))
    assert preview.frames.shape == (6, 32, 64, 3) and preview.fps == 24  # decoded: 2 clips side by side


def test_a_recipe_with_another_vae_than_the_cache_is_refused(cache, vaes):
    res = runner.invoke(app, ["train", str(TINY), *FAST, "data.source=latents", f"data.latents={cache}",
                              f"vae.path={vaes[1]}", "--validate"])
    assert res.exit_code == 2 and "holds AutoencoderKLWan" in res.output and "use that VAE or re-cache" in res.output
    res = runner.invoke(app, ["train", str(TINY), *FAST, "data.source=latents", f"data.latents={cache.parent}/none"])
    assert res.exit_code == 2 and "latent cache not found" in res.output
    res = runner.invoke(app, ["train", str(TINY), *FAST, "data.source=latents", f"data.latents={cache}",
                              "train.batch_size=100000000", "--validate"])  # memory estimated on the latents' tokens
    assert res.exit_code == 2 and "100000000 clip(s) of 20 tokens at once needs about" in res.output


def test_on_the_fly_encoding_through_a_video_vae(vaes, tmp_path):
    args = ["train", str(TINY), *FAST, *PIXELS, "data.num_frames=9", "train.preview_frames=5", f"vae.path={vaes[1]}"]
    res = runner.invoke(app, [*args, "--validate"])
    assert res.exit_code == 0, res.output
    assert "4 x 3 x 4 x 4" in res.output and "on the fly AutoencoderKLWan" in " ".join(res.output.split())
    res = runner.invoke(app, [*args, "train.steps=1", "train.preview_every=1", "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    state = state_of(tmp_path / "run")
    assert state["arch"]["num_frames"] == 3 and state["vae"]["temporal"] == 4
    assert read_video(next((tmp_path / "run" / "previews").glob("*.mp4"))).frames.shape[0] == 5
    out = tmp_path / "samples"  # --seconds 0.3 at 30 fps is 9 frames: 3 latents, decoded to 4k+1 = 9 frames
    res = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "run"), "--fps", "30", "--seconds", "0.3", "-N", "1",
                              "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    video = read_video(next(out.glob("*.mp4")))
    assert video.frames.shape[0] == 9 and video.fps == 30
    doc = json.loads((out / "samples.json").read_text())
    ts = doc["timestamps"]
    assert doc["latent_timestamps"] == pytest.approx([0, sum(ts[1:5]) / 4, sum(ts[5:9]) / 4])
    res = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "run"), "--fps", "30", "--frames", "8", "-N", "1",
                              "--out", str(out)])
    assert res.exit_code == 2 and "4k+1 frames (e.g. 5 or 9)" in res.output
    clip = next(out.glob("*.mp4"))  # retime --mode model refuses a temporally compressing VAE, in one line
    res = runner.invoke(app, ["retime", str(clip), "--fps", "60", "--mode", "model", "--ckpt", str(tmp_path / "run"),
                              "--out", str(tmp_path / "r.mp4")])
    assert res.exit_code == 2 and "needs a per-frame VAE" in res.output and "mode 'resample'" in res.output
    assert not (tmp_path / "r.mp4").exists()
    res = runner.invoke(app, ["train", str(TINY), *FAST, *PIXELS, "data.num_frames=6", f"vae.path={vaes[1]}", "--validate"])
    assert res.exit_code == 2 and "needs 4k+1 frames (e.g. 5 or 9)" in res.output


@pytest.mark.parametrize("name,download", [
    ("ucf101-sdvae-B2.yaml", "huggingface-cli download stabilityai/sd-vae-ft-ema"),
    ("ucf101-sdvae-XL2.yaml", "huggingface-cli download stabilityai/sd-vae-ft-ema"),
    ("ucf101-wan-B2.yaml", "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --include \"vae/*\""),
])
def test_latent_recipes_say_what_to_download_and_build_with_their_vae_kind(name, download, vaes, cache):
    path = REPO / "recipes" / name
    header = path.read_text().split("\nname:")[0]
    assert download in header and "eqmctl.cli cache" in header and "eqmctl.cli train" in header
    rec = load_recipe(path)
    assert rec.data.source == "latents" and (rec.data.height, rec.data.width) == (256, 256) and rec.vae.path
    small = ["model.size=tiny", "data.num_workers=0", "--validate"]
    if "wan" in name:  # on the fly through the tiny video VAE: the recipe's 17 frames fit 4k+1
        args = [f"vae.path={vaes[1]}", "data.source=synthetic", "data.height=32", "data.width=32"]
    else:  # from a cache made by the tiny image VAE
        args = [f"vae.path={vaes[0]}", f"data.latents={cache}"]
    res = runner.invoke(app, ["train", str(path), *args, *small])
    assert res.exit_code == 0, res.output


def test_sample_decodes_with_the_checkpoints_vae_at_the_exact_rate(cache_run, vaes, tmp_path):
    import av

    fps, frames = "30000/1001", 7

    out = tmp_path / "samples"
    res = runner.invoke(app, ["sample", "--ckpt", str(cache_run), "--fps", str(fps), "--frames", str(frames),
                              "-N", "2", "--steps", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    files = sorted(out.glob("*.mp4"))
    assert len(files) == 2
    with av.open(str(files[0])) as c:
        stream = c.streams.video[0]
        assert str(stream.average_rate) == str(fps)
        n = sum(1 for _ in c.decode(stream))
    assert n == frames and read_video(files[0]).frames.shape[1:3] == (32, 32)
    doc = json.loads((out / "samples.json").read_text())
    assert doc["vae"]["class_name"] == "AutoencoderKL" and doc["latent_timestamps"] == doc["timestamps"]


def test_sample_with_a_moved_or_wrong_vae_folder(cache_run, vaes, tmp_path):
    import shutil

    moved = tmp_path / "moved-vae"
    shutil.copytree(vaes[0], moved)
    res = runner.invoke(app, ["sample", "--ckpt", str(cache_run), "--fps", "24", "--frames", "3", "-N", "1",
                              "--steps", "2", "--vae", str(moved), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "--ckpt", str(cache_run), "--fps", "24", "-N", "1", "--vae", str(vaes[1]),
                              "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "is not the one these latents were made with" in res.output


def test_retime_model_mode_through_a_per_frame_vae(cache_run, tmp_path):
    """Originals encoded and clamped in latent space, in-betweens decoded: 12 -> 24 fps doubles
    the frames, keeps the duration and plays at exactly 24 fps."""
    import numpy as np

    from eqm.video.io import write_video

    src = tmp_path / "in.mp4"
    frames = (np.random.default_rng(0).random((4, 40, 48, 3)) * 255).astype(np.uint8)
    write_video(src, frames, 12)
    res = runner.invoke(app, ["retime", str(src), "--fps", "24", "--mode", "model", "--ckpt", str(cache_run),
                              "--steps", "2", "--out", str(tmp_path / "out.mp4"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{"):])
    assert (doc["frames_in"], doc["frames_out"], doc["generated"]) == (4, 8, 4)
    video = read_video(tmp_path / "out.mp4")
    assert video.fps == 24 and video.frames.shape == (8, 40, 48, 3)
