"""What the tool promises under hostile input and faults (docs/reliability.md lists each promise
and the test here, or elsewhere, that checks it). Everything runs on real files: videos written
with PyAV, checkpoints written by eqm.checkpoint, symlinks and FIFOs made with os."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eqm import checkpoint as C
from eqm.errors import EqmError
from eqm.config import EqMConfig
from eqm.model import EqMTransformer
from eqm.video.io import write_video
from eqm.video.probe import read_manifest, write_manifest
from eqmctl.cli import app

ARCH = dict(input_size=8, num_frames=4, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=2,
            class_dropout_prob=0.1)


def run(args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_line_error(stderr: str, *needles: str) -> None:
    """stderr is a single `error:` line (no traceback) containing every needle."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def tiny_video(path: Path, frames: int = 4) -> Path:
    arr = np.zeros((frames, 16, 16, 3), np.uint8)
    arr[:, 4:8, 4:8] = 200
    write_video(path, arr, 12)
    return path


def tiny_model(seed: int = 0) -> EqMTransformer:
    torch.manual_seed(seed)
    m = EqMTransformer(EqMConfig(**ARCH))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():  # adaLN-Zero starts at zero output: give the field some shape
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def save_ckpt(run_dir: Path, model, step: int = 10) -> Path:
    return C.save_checkpoint(run_dir, step, model=model, ema=model, config=model.config, recipe={"name": "t"})


# ------------------------------------------------------------------------------------------------
# 1. probe-fps --manifest never destroys data


@pytest.fixture()
def two_videos(tmp_path):
    d = tmp_path / "clips"
    d.mkdir()
    return tiny_video(d / "a.mp4"), tiny_video(d / "b.mp4")


def test_manifest_refuses_to_replace_a_video_or_a_non_manifest(two_videos, tmp_path):
    a, b = two_videos
    before = a.read_bytes()
    # the forgotten-name case: `probe-fps --manifest *.mp4` makes the first video the manifest
    code, _, err = run(["probe-fps", "--manifest", a, b])
    assert code == 2
    one_line_error(err, str(a), "not a manifest", "--force")
    assert a.read_bytes() == before
    # an input being probed is never replaced, not even with --force (nor through a symlink)
    for target in (a, tmp_path / "link.jsonl"):
        if target.name == "link.jsonl":
            target.symlink_to(a)
        code, _, err = run(["probe-fps", "--force", "--manifest", target, a.parent])
        assert code == 2
        one_line_error(err, "one of the files being probed")
        assert a.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, _, err = run(["probe-fps", "--manifest", notes, b])
    assert code == 2 and notes.read_text() == "my notes\n"
    code, _, _ = run(["probe-fps", "--force", "--manifest", notes, b])
    assert code == 0 and read_manifest(notes)[0].path == str(b)


def test_manifest_replaces_its_own_manifest_and_never_a_fifo_or_device(two_videos, tmp_path):
    a, b = two_videos
    mp = tmp_path / "m.jsonl"
    assert run(["probe-fps", "--manifest", mp, a])[0] == 0
    assert run(["probe-fps", "--manifest", mp, a, b])[0] == 0  # a manifest we wrote: replaced
    assert len(read_manifest(mp)) == 2
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (fifo, Path("/dev/null")):
        code, _, err = run(["probe-fps", "--force", "--manifest", target, a])
        assert code == 2
        one_line_error(err, "not a regular file")
    assert fifo.is_fifo()
    # the library refuses the same way
    with pytest.raises(EqmError, match="not a manifest"):
        write_manifest([], a)


# ------------------------------------------------------------------------------------------------
# 2. NaN / inf: an error naming the checkpoint, never "converged"; JSON always valid


def strict_json(text: str):
    """json.loads that refuses the non-standard NaN / Infinity words."""
    def refuse(word):
        raise ValueError(f"invalid JSON constant {word}")
    return json.loads(text, parse_constant=refuse)


def poison(ckpt: Path, fn, files=(C.MODEL_FILE, C.EMA_FILE)) -> None:
    """Rewrite the checkpoint's weight files with fn(name, tensor) applied to every tensor."""
    from safetensors.torch import load_file, save_file

    for name in files:
        sd = load_file(str(ckpt / name))
        save_file({k: fn(k, v).contiguous() for k, v in sd.items()}, str(ckpt / name))


def test_nan_weights_are_an_error_naming_the_checkpoint(tmp_path):
    ck = save_ckpt(tmp_path / "run", tiny_model())
    poison(ck, lambda k, v: v.clone().fill_(float("nan")) if k.startswith("final_layer.linear") else v)
    out = tmp_path / "out"
    code, stdout, err = run(["sample", "--fps", 12, "--ckpt", ck, "--out", out, "-N", 2, "--steps", 3])
    assert code == 1
    one_line_error(err, str(ck), "NaN/inf", "final_layer.linear")
    assert not out.exists()


def test_overflowing_model_is_an_error_not_converged(tmp_path):
    """Finite weights whose output overflows: the sampler's NaN/inf gradient RMS is an error (a NaN
    RMS once passed the adaptive-stop test `rms >= tol` as converged and exited 0)."""
    from eqm.sampler import sample as run_sampler

    ck = save_ckpt(tmp_path / "run", tiny_model())
    poison(ck, lambda k, v: v.clone().fill_(3e38) if "adaLN" in k or "final_layer" in k else v)
    out = tmp_path / "out"
    code, _, err = run(["sample", "--fps", 12, "--ckpt", ck, "--out", out, "-N", 2, "--tol", 0.01])
    assert code == 1
    one_line_error(err, f"checkpoint {ck}", "not finite")
    assert not (out / "samples.json").exists()
    model, _ = C.load_model(ck)
    with pytest.raises(EqmError, match="not finite") as e:
        run_sampler(model, (2, 3, 4, 8, 8), torch.arange(4) / 12.0, tol=0.5, steps=5)
    assert e.value.exit_code == 1


def test_json_written_is_always_valid_json(tmp_path):
    from eqm.generate import Generation, write_generation
    from eqm.jsonio import dumps
    from fractions import Fraction

    assert strict_json(dumps({"a": [float("nan"), 1.5, float("-inf")], "b": (float("inf"),)})) == \
        {"a": [None, 1.5, None], "b": [None]}
    gen = Generation(videos=torch.zeros(1, 3, 2, 8, 8), labels=None, evals=torch.tensor([3]),
                     final_rms=torch.tensor([float("nan")]), timestamps=torch.tensor([0.0, 0.5]), fps=Fraction(2),
                     settings={"tol": float("inf")})
    summary = write_generation(gen, tmp_path / "out", fmt="gif")
    doc = strict_json(summary.manifest.read_text())
    assert doc["samples"][0]["final_rms"] is None and doc["settings"]["tol"] is None


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_non_float_weights_are_refused(tmp_path, dtype):
    ck = save_ckpt(tmp_path / "run", tiny_model())
    poison(ck, lambda k, v: v.to(dtype) if k == "final_layer.linear.bias" else v)
    code, _, err = run(["sample", "--fps", 12, "--ckpt", ck, "--out", tmp_path / "o", "-N", 1, "--steps", 1])
    assert code == 2
    one_line_error(err, "final_layer.linear.bias", "floating point")
