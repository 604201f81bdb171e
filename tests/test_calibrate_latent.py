"""`eqmctl calibrate` on a latent-space checkpoint: samples decoded by the VAE the checkpoint
recorded (a tiny diffusers AutoencoderKL on disk), reference clips read in pixels from the videos
the latent cache was made from; a moved VAE or cache is a one-line error."""

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from tiny_vae import save_tiny_kl
from typer.testing import CliRunner

from eqm.cache import build_cache
from eqm.recipe import load_recipe
from eqmctl.cli import app

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny-synthetic.yaml"
PIXELS = ["data.height=32", "data.width=32", "data.num_frames=5", "data.synthetic.length=8", "data.synthetic.num_classes=2",
          "vae.batch_size=8"]
FAST = ["model.patch_size=2", "model.depth=1", "train.batch_size=4", "train.warmup_steps=0", "train.steps=2",
        "train.preview_every=0"]
runner = CliRunner()


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """(run dir, VAE folder, cache folder) of a latent model trained 2 steps from a cache."""
    root = tmp_path_factory.mktemp("latent-cal")
    vae = save_tiny_kl(root / "kl")
    build_cache(load_recipe(TINY, PIXELS + [f"vae.path={vae}"]), root / "cache", shard_size=8, log=lambda _l: None)
    res = runner.invoke(app, ["train", str(TINY), *FAST, "data.source=latents", f"data.latents={root / 'cache'}",
                              "--run-dir", str(root / "run")])
    assert res.exit_code == 0, res.output
    return root / "run", vae, root / "cache"


def calibrate(run, out, *extra):
    return runner.invoke(app, ["calibrate", "--ckpt", str(run), "--rates", "12,24", "--samples", "1", "--ref-clips", "4",
                               "--steps", "2", "--cfg-scales", "1", "--out", str(out), *extra])


def test_calibrate_measures_a_latent_checkpoint_on_decoded_frames(latent_run, tmp_path):
    run, vae, _ = latent_run
    res = calibrate(run, tmp_path / "cal")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert doc["rates"] == ["12", "24"] and len(doc["results"]) == 2
    assert all(r["clips"] == 2 and r["frames"] >= 2 for r in doc["results"])  # one clip per class, decoded RGB
    assert all(r["measured"] > 0 and r["ratio"] > 0 for r in doc["results"])  # seeded: the same noise every run
    assert doc["vae"]["class_name"] == "AutoencoderKL" and doc["vae"]["path"] == str(vae.resolve())
    # the reference: the synthetic clips the cache was made from, in pixels at the decoded 32 px
    assert doc["reference"]["data"] == "synthetic source" and doc["reference"]["measured"] > 0


@contextlib.contextmanager
def moved_aside(path, to):
    """``path`` moved to ``to`` for the block, then put back (the module's run is shared)."""
    shutil.move(str(path), to)
    try:
        yield to
    finally:
        shutil.move(str(to), path)


def assert_one_error(res, text):
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and text in errors[0], res.output


def test_a_moved_vae_is_one_line_and_vae_names_its_new_folder(latent_run, tmp_path):
    run, vae, _ = latent_run
    with moved_aside(vae, tmp_path / "moved-kl") as moved:
        res = calibrate(run, tmp_path / "cal")
        assert_one_error(res, "VAE folder not found")
        assert "Traceback" not in res.output and not (tmp_path / "cal").exists()
        res = calibrate(run, tmp_path / "cal", "--rates", "24", "--vae", str(moved))
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["results"][0]["clips"] == 2


def test_a_missing_latent_cache_asks_for_the_source_videos(latent_run, tmp_path):
    run, _, cache = latent_run
    with moved_aside(cache, tmp_path / "moved-cache"):
        assert_one_error(calibrate(run, tmp_path / "cal"), "pass data (--data")
        source = tmp_path / "source.yaml"  # the recipe the cache was made from, in pixels
        source.write_text(yaml.safe_dump(load_recipe(TINY, PIXELS).to_dict()))
        res = calibrate(run, tmp_path / "cal", "--rates", "24", "--data", str(source))
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["reference"]["measured"] > 0
