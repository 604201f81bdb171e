"""The training loop: real short runs on the synthetic source, through the CLI and the library.

Every run here is real (the synthetic dataset, the EqM loss, AdamW, checkpoints on disk, MP4
previews written and decoded with PyAV), only small: 16x16 frames, 4 frames, 2 blocks.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eqm import checkpoint as C
from eqm.errors import EqmError
from eqm.recipe import load_recipe
from eqm.latent import recipe_dataset
from eqm.train import EMA, DivergenceGuard, LRSchedule, StepBatchSampler, derive_seed, train
from eqmctl.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-synthetic.yaml"
FAST = [
    "data.height=16", "data.width=16", "model.patch_size=4", "data.num_frames=4", "model.depth=2",
    "train.batch_size=4", "data.synthetic.length=64", "train.log_every=1", "train.warmup_steps=0",
    "train.preview_every=0", "train.lr_schedule=constant", "train.lr=1e-3",
]
runner = CliRunner()


def recipe(*overrides):
    return load_recipe(TINY, FAST + list(overrides))


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def quiet(_line):
    pass


# --- pieces ----------------------------------------------------------------------------------


def test_step_batch_sampler_is_a_function_of_step():
    n, B = 10, 3
    one = StepBatchSampler(n, B, seed=5, stop_micro=20)
    batches = list(one)
    assert len(batches) == 20 and all(len(b) == B for b in batches)
    stream = [i for b in batches for i in b]
    for e in range(5):  # every epoch is a permutation of the dataset
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    # starting later gives exactly the tail: resume needs no replay
    assert list(StepBatchSampler(n, B, seed=5, start_micro=7, stop_micro=20)) == batches[7:]
    # two ranks read disjoint, interleaved slices of the same stream
    r0 = list(StepBatchSampler(n, B, seed=5, rank=0, world=2, stop_micro=10))
    r1 = list(StepBatchSampler(n, B, seed=5, rank=1, world=2, stop_micro=10))
    assert [i for a, b in zip(r0, r1) for i in a + b] == stream
    assert list(StepBatchSampler(n, B, seed=6, stop_micro=20)) != batches
    assert derive_seed(1, "noise", 3) == derive_seed(1, "noise", 3) != derive_seed(1, "noise", 4)


def test_lr_schedule_and_ema():
    s = LRSchedule(warmup=4, total=14, kind="cosine", min_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0) and s(13) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(4, 13))
    assert LRSchedule(0, 10)(9) == 1.0

    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.9)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * m.weight)
    assert not ema.module.weight.requires_grad


def test_batches_mix_frame_rates_with_per_sample_timestamps():
    r = recipe("data.synthetic.length=32")
    ds = recipe_dataset(r)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=StepBatchSampler(len(ds), 8, seed=0, stop_micro=1))
    batch = next(iter(loader))
    ts = batch["timestamps"]
    assert batch["video"].shape == (8, 3, 4, 16, 16) and ts.shape == (8, 4)
    assert torch.all(ts[:, 0] == 0)
    rates = 1.0 / (ts[:, 1] - ts[:, 0])
    assert rates.min() >= 8 - 1e-3 and rates.max() <= 30 + 1e-3
    assert rates.max() - rates.min() > 2  # one batch, several frame rates
    # the model gives each sample its own temporal code
    from eqm.train import build_model

    model = build_model(r, ds.num_classes)
    pos = model.positions(ts, 4)
    assert pos.add.shape[0] == 8 and not torch.allclose(pos.add[0], pos.add[1])


# --- a real run through the CLI --------------------------------------------------------------


def test_cli_train_writes_run_dir(tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, [
        "train", str(TINY), *FAST, "train.steps=4", "train.ckpt_every=2", "train.keep_last=1",
        "train.preview_every=4", "train.preview_fps=12", "train.preview_samples=2", "sample.steps=3",
        "--run-dir", str(run),
    ])
    assert res.exit_code == 0, res.output
    assert "step 4/4" in res.output and "loss" in res.output

    saved = load_recipe(run / "recipe.yaml")
    assert saved.train.steps == 4 and saved.data.height == 16 and saved.name == "tiny-synthetic"
    assert [p.name for p in C.list_checkpoints(run)] == ["step_0000004"]  # keep_last=1 pruned step 2
    ck = run / "checkpoints" / "step_0000004"
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 4 and state["recipe"] == saved.to_dict() and state["arch"]["num_frames"] == 4

    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "time"} <= set(r)
        assert math.isfinite(r["loss"]) and r["samples_per_s"] > 0

    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["step"] == 4 and summary["replicas_identical"]
    model, st = C.load_model(run)
    assert st["weights"].endswith("ema.safetensors")
    assert C.weights_checksum(C.load_model(run, use_ema=False)[0]) == summary["rank_checksums"][0]

    import av

    preview = run / "previews" / "step_0000004.mp4"
    with av.open(str(preview)) as f:
        stream = f.streams.video[0]
        frames = [fr for fr in f.decode(stream)]
        assert stream.average_rate == Fraction(12) and len(frames) == 4
        assert (frames[0].width, frames[0].height) == (32, 16)  # 2 samples side by side


def test_default_run_dir_and_validate(tmp_path):
    root = tmp_path / "runs"
    res = runner.invoke(app, ["train", str(TINY), *FAST, "--validate", "--runs-root", str(root)])
    assert res.exit_code == 0, res.output
    assert "parameters" in res.output and "64 clips" in res.output and "4 classes" in res.output
    assert not root.exists()  # a dry run writes nothing

    res = runner.invoke(app, ["train", str(TINY), *FAST, "train.steps=1", "--runs-root", str(root)])
    assert res.exit_code == 0, res.output
    (run,) = list(root.iterdir())
    assert run.name.startswith("tiny-synthetic-") and C.latest_checkpoint(run).name == "step_0000001"
    # a fresh run refuses a directory that already has checkpoints
    res = runner.invoke(app, ["train", str(TINY), *FAST, "train.steps=1", "--run-dir", str(run)])
    assert res.exit_code == 2 and "already has checkpoints" in res.output
    # --resume latest finds the newest run of this recipe under the runs root
    res = runner.invoke(app, ["train", str(TINY), *FAST, "train.steps=2", "--resume", "latest", "--runs-root", str(root)])
    assert res.exit_code == 0, res.output
    assert list(root.iterdir()) == [run] and C.latest_checkpoint(run).name == "step_0000002"
    assert [r["step"] for r in metrics(run)] == [1, 2]


def test_missing_tracker_package_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    res = runner.invoke(app, ["train", str(TINY), *FAST, "tracking.backend=wandb", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "'wandb' package is not installed" in res.output
    assert not (tmp_path / "r").exists()


# --- accumulation, resume, divergence --------------------------------------------------------


def test_grad_accum_side_effects_once_per_optimizer_step(tmp_path):
    r = recipe("train.steps=3", "train.grad_accum=3", "train.warmup_steps=10", "train.batch_size=2")
    res = train(r, tmp_path / "run", log=quiet)
    assert res.step == 3
    rows = metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert [row["lr"] for row in rows] == pytest.approx([1e-4, 2e-4, 3e-4])  # warmup advanced once per step
    ts = C.load_training_state(res.last_checkpoint)
    assert ts["scheduler"]["last_epoch"] == 3
    assert {int(s["step"]) for s in ts["optimizer"]["state"].values()} == {3}  # 3 Adam steps, not 9


def test_resume_continues_exactly(tmp_path):
    common = ("train.grad_accum=2", "train.warmup_steps=3", "train.ema_decay=0.5", "train.batch_size=2")
    full = train(recipe("train.steps=6", *common), tmp_path / "full", log=quiet)
    part = train(recipe("train.steps=3", *common), tmp_path / "part", log=quiet)
    assert part.step == 3 and part.checksum != full.checksum
    resumed = train(recipe("train.steps=6", *common), tmp_path / "part", resume="latest", log=quiet, warn=quiet)
    assert resumed.start_step == 3 and resumed.step == 6
    assert resumed.checksum == full.checksum  # the same weights, bit for bit
    ema_full = C.weights_checksum(C.load_model(tmp_path / "full", use_ema=True)[0])
    ema_res = C.weights_checksum(C.load_model(tmp_path / "part", use_ema=True)[0])
    assert ema_full == ema_res
    assert [r["loss"] for r in metrics(tmp_path / "part")] == [r["loss"] for r in metrics(tmp_path / "full")]
    # resuming from an explicit checkpoint path works as well (and rewinds the metrics log)
    again = train(recipe("train.steps=6", *common), resume=tmp_path / "part" / "checkpoints" / "step_0000006", log=quiet, warn=quiet)
    assert again.run_dir == tmp_path / "part" and again.step == 6


def test_resuming_an_older_checkpoint_sets_the_abandoned_branch_aside(tmp_path):
    run = tmp_path / "run"
    first = train(recipe("train.steps=6", "train.ckpt_every=2", "train.keep_last=0"), run, log=quiet)
    old4 = C.weights_checksum(C.load_model(run / "checkpoints" / "step_0000004", use_ema=False)[0])
    lines = []
    res = train(recipe("train.steps=4", "train.ckpt_every=2", "train.keep_last=0"),
                resume=run / "checkpoints" / "step_0000002", log=lines.append, warn=quiet)
    assert res.run_dir == run and res.start_step == 2 and res.step == 4
    # the newer checkpoints and metric lines of the first run are kept, out of the way
    (aside,) = (run / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_0000004", "step_0000006"]
    assert [json.loads(x)["step"] for x in (aside / "metrics.jsonl").read_text().splitlines()] == [3, 4, 5, 6]
    assert any(line.startswith("history after step 2 (an abandoned branch) moved to") for line in lines)
    assert [p.name for p in C.list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    state = C.load_state(C.latest_checkpoint(run))
    assert state["resumed_from"] == {"step": 2, "checkpoint": str(run / "checkpoints" / "step_0000002")}
    assert C.load_state(run / "checkpoints" / "step_0000002")["resumed_from"] is None
    assert res.checksum == old4  # the same steps again, bit for bit
    # `--resume latest` now continues the new branch, not the abandoned step 6
    again = train(recipe("train.steps=5", "train.ckpt_every=2", "train.keep_last=0"), run, resume="latest", log=quiet, warn=quiet)
    assert again.start_step == 4 and again.step == 5 and first.step == 6
    # an abandoned checkpoint still resolves, and to its own run directory
    assert C.run_dir_of(aside / "step_0000006") == run and C.resolve_checkpoint(aside / "step_0000006") == aside / "step_0000006"


def test_a_run_directory_has_one_training_at_a_time(tmp_path):
    run = tmp_path / "run"
    train(recipe("train.steps=2"), run, log=quiet)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holder = subprocess.Popen(  # a real training that would run for a long time
        [sys.executable, "-m", "eqmctl.cli", "train", str(TINY), *FAST, "train.steps=1000000", "train.ckpt_every=1000000",
         "--run-dir", str(run), "--resume", "latest"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    try:
        for _ in range(600):  # until it has started training (it appends to the log after the lock)
            if holder.poll() is not None or "step 3/" in (run / "log.txt").read_text():
                break
            time.sleep(0.2)
        assert holder.poll() is None and f"pid {holder.pid} on " in (run / "run.lock").read_text()
        for args in (["--resume", "latest", "train.steps=3"], ["train.steps=3"]):
            res = runner.invoke(app, ["train", str(TINY), *FAST, *args, "--run-dir", str(run)])
            assert res.exit_code == 2 and "Traceback" not in res.output, res.output
            (err,) = [line for line in res.output.splitlines() if line.startswith("error:")]
            assert f"{run} is in use by another training (pid {holder.pid} on " in err and "started 20" in err, err
        assert [p.name for p in C.list_checkpoints(run)] == ["step_0000002"]  # nothing touched
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
        holder.wait()
    res = train(recipe("train.steps=3"), run, resume="latest", log=quiet, warn=quiet)  # a stale lock never blocks
    assert res.start_step == 2 and res.step == 3
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]  # the killed run's lines were set aside
    assert (run / "run.lock").read_text() == ""  # released at the end


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    import errno

    from eqm import fsio

    real = fsio.publish_dir

    def publish(tmp, final):
        if Path(final).name != "step_0000001":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, final)

    monkeypatch.setattr(fsio, "publish_dir", publish)
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(TINY), *FAST, "train.steps=3", "train.ckpt_every=1", "--run-dir", str(run)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    (err,) = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert f"cannot write checkpoint step_0000002 in {run / 'checkpoints'}: No space left on device" in err
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000001"]  # intact, no temporary left


def test_a_refused_new_run_leaves_no_directory(tmp_path):
    with pytest.raises(EqmError, match="model.init_from"):
        train(recipe("train.steps=1", f"model.init_from={tmp_path / 'missing.pt'}"), tmp_path / "new", log=quiet)
    assert not (tmp_path / "new").exists()


def test_resume_with_raised_steps_follows_the_recipes_schedule(tmp_path):
    # "raise train.steps to continue": the added steps follow the recipe's cosine over the new
    # total, as a 6-step run's last 3 steps do (the checkpoint's own 3-step schedule would have
    # sat at its final lr for every added step)
    common = ("train.lr_schedule=cosine", "train.warmup_steps=1", "train.min_lr_ratio=0.1", "train.batch_size=2")
    train(recipe("train.steps=3", *common), tmp_path / "part", log=quiet)
    first = [1e-3 * LRSchedule(1, 3, "cosine", 0.1)(k) for k in range(3)]
    assert [r["lr"] for r in metrics(tmp_path / "part")] == pytest.approx(first)
    assert first[-1] == pytest.approx(1e-4)  # the 3-step cosine ended at its floor
    lines = []
    resumed = train(recipe("train.steps=6", *common), tmp_path / "part", resume="latest", log=lines.append, warn=quiet)
    assert resumed.start_step == 3 and resumed.step == 6
    want = [1e-3 * LRSchedule(1, 6, "cosine", 0.1)(k) for k in range(6)]
    assert want[3] > 2 * first[-1]
    assert [r["lr"] for r in metrics(tmp_path / "part")] == pytest.approx(first + want[3:])
    note = [line for line in lines if line.startswith("lr schedule from the recipe")]
    assert len(note) == 1 and "cosine over 6 steps" in note[0] and "cosine over 3 steps" in note[0], lines
    assert "lr at step 3: " + f"{want[3]:.2e}" in note[0]
    assert "lr schedule from the recipe" in (tmp_path / "part" / "log.txt").read_text()


def test_resume_applies_a_lowered_lr_and_weight_decay(tmp_path):
    # the divergence message's advice ("lower train.lr, then resume from <checkpoint>") must take effect
    train(recipe("train.steps=2", "train.weight_decay=0.0"), tmp_path / "run", log=quiet)
    lines = []
    train(recipe("train.steps=4", "train.lr=2.5e-4", "train.weight_decay=0.05"), tmp_path / "run",
          resume="latest", log=lines.append, warn=quiet)
    assert [r["lr"] for r in metrics(tmp_path / "run")] == pytest.approx([1e-3, 1e-3, 2.5e-4, 2.5e-4])
    ts = C.load_training_state(C.latest_checkpoint(tmp_path / "run"))
    assert {g["weight_decay"] for g in ts["optimizer"]["param_groups"]} == {0.05}
    assert any(line.startswith("lr schedule from the recipe") for line in lines)
    # an unchanged recipe resumes without the note
    lines.clear()
    train(recipe("train.steps=5", "train.lr=2.5e-4", "train.weight_decay=0.05"), tmp_path / "run",
          resume="latest", log=lines.append, warn=quiet)
    assert not any(line.startswith("lr schedule") for line in lines), lines
    # a checkpoint already at train.steps: nothing trained, and the log says so
    lines.clear()
    res = train(recipe("train.steps=5", "train.lr=2.5e-4", "train.weight_decay=0.05"), tmp_path / "run",
                resume="latest", log=lines.append, warn=quiet)
    assert res.step == 5 and "nothing to train" in lines[0] and "no step trained" in lines[-1], lines


def test_resume_keeps_the_checkpoints_time_layout(tmp_path):
    """A resumed run keeps the sincos layout its checkpoint was trained with; asking for another
    one is an error.  A checkpoint saved before ``time_order`` existed loads as "aligned"."""
    run = tmp_path / "paired"
    train(recipe("train.steps=2", "model.time.order=paired"), run, log=quiet)
    assert C.load_model(run)[0].config.time_order == "paired"
    resumed = train(recipe("train.steps=3"), run, resume="latest", log=quiet, warn=quiet)  # order: null
    assert resumed.start_step == 2 and resumed.step == 3
    model, state = C.load_model(run)
    assert state["arch"]["time_order"] == "paired" and model.config.time_order == "paired"
    res = runner.invoke(app, ["train", str(TINY), *FAST, "train.steps=4", "model.time.order=aligned",
                              "--run-dir", str(run), "--resume", "latest"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    err = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "model.time.order is aligned" in err[0] and "trained with paired" in err[0], res.output
    assert C.latest_checkpoint(run).name == "step_0000003"  # nothing written by the refused run

    old = train(recipe("train.steps=1"), tmp_path / "old", log=quiet).run_dir  # the default layout
    for ck in C.list_checkpoints(old):  # what a checkpoint of the earlier eqmctl looks like
        st = json.loads((ck / "state.json").read_text())
        assert st["arch"].pop("time_order") == "aligned"
        (ck / "state.json").write_text(json.dumps(st))
    assert C.load_model(old)[0].config.time_order == "aligned"
    res = runner.invoke(app, ["train", str(TINY), *FAST, "train.steps=2", "model.time.order=paired",
                              "--run-dir", str(old), "--resume", "latest"])
    assert res.exit_code != 0 and "trained with aligned" in res.output


def test_time_shift_trains_on_shifted_positions_reproducibly(tmp_path):
    plain = train(recipe("train.steps=3"), tmp_path / "plain", log=quiet)
    shifted = train(recipe("train.steps=3", "train.time_shift=0.5"), tmp_path / "a", log=quiet)
    again = train(recipe("train.steps=3", "train.time_shift=0.5"), tmp_path / "b", log=quiet)
    assert shifted.checksum == again.checksum  # the shift comes from the seeded RNG
    assert shifted.checksum != plain.checksum  # and it reaches the model
    losses = [r["loss"] for r in metrics(tmp_path / "a")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    # Same data, noise and dropout (the shift has its own RNG stream): step 1 is identical (the
    # adaLN-Zero model starts at f = 0 whatever the positions), later steps differ only through them.
    base = [r["loss"] for r in metrics(tmp_path / "plain")]
    assert losses[0] == base[0] and losses[1] != base[1] and losses[2] != base[2]


def test_divergence_stops_with_exit_1_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, [
        "train", str(TINY), *FAST, "train.lr=1", "train.grad_clip=0", "train.steps=50", "train.ckpt_every=1",
        "train.keep_last=0", "--run-dir", str(run),
    ])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    err = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "diverged at step 2: loss" in err[0] and "running level" in err[0], err
    # step 1 moved the weights by lr 1 unclipped: the checkpoint of step 1 is the one step 2 measured
    assert "no checkpoint of this run was followed by a healthy step" in err[0] and "train again" in err[0]
    assert C.list_checkpoints(run) == [] and not (run / "summary.json").exists()
    (aside,) = (run / "checkpoints").glob("abandoned-*")
    assert (aside / "step_0000001" / "state.json").is_file()  # moved, not deleted
    # the advice works as printed: the same --run-dir trains again (as a new run)
    res = runner.invoke(app, ["train", str(TINY), *FAST, "train.steps=2", "--run-dir", str(run)])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in metrics(run)] == [1, 2]


def test_an_early_blow_up_names_a_checkpoint_whose_loss_was_healthy(tmp_path):
    """A loss far above its running level stops the run long before NaN, and the checkpoint it
    names is one whose weights gave a healthy loss; resuming from it as advised trains on."""
    run = tmp_path / "run"
    train(recipe("train.steps=6", "train.ckpt_every=2", "train.keep_last=0"), run, log=quiet)
    healthy = max(r["loss"] for r in metrics(run))
    res = runner.invoke(app, ["train", str(TINY), *FAST, "train.steps=30", "train.lr=1", "train.grad_clip=0",
                              "train.ckpt_every=1", "train.keep_last=1", "--run-dir", str(run), "--resume", "latest"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    (err,) = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert "diverged at step 8: loss" in err and "times its running level" in err, err
    good = run / "checkpoints" / "step_0000006"  # step 7's loss (of these weights) was healthy
    assert f"the last good checkpoint is {good} (the next step's loss was " in err
    proof = float(err.split("the next step's loss was ")[1].split(")")[0])
    assert proof < 2 * healthy
    # step 7's checkpoint (the weights step 8 measured) is set aside; keep_last=1 kept the good one
    assert C.list_checkpoints(run) == [good]
    (aside,) = (run / "checkpoints").glob("abandoned-*")
    assert (aside / "step_0000007" / "state.json").is_file()
    # the advice: a lower lr, then resume from that checkpoint; the loss stays at its healthy level
    assert f"lower train.lr (now 1) or raise train.warmup_steps (now 0), then resume from {good}" in err
    res = runner.invoke(app, ["train", str(TINY), *FAST, "train.steps=10", "--resume", str(good)])
    assert res.exit_code == 0, res.output
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 11)) and max(r["loss"] for r in rows) < 2 * healthy


def test_divergence_guard_levels():
    g = DivergenceGuard(loss_factor=10, grad_factor=100, warmup=3)
    assert g.verdict(30.0, 5.0) is None  # the first step sets the levels
    assert "loss 400 is" in g.verdict(400.0, 5.0)  # the loss is judged from the second step
    assert g.verdict(29.0, 2000.0) is None  # the gradient norm only after `warmup` healthy steps
    assert g.verdict(25.0, 5.0) is None and g.steps == 3
    assert "gradient norm" in g.verdict(25.0, 1e6) and "diverge_grad_norm=100" in g.verdict(25.0, 1e6)
    assert "loss nan" in g.verdict(float("nan"), 5.0) and "gradient norm inf" in g.verdict(1.0, float("inf"))
    back = DivergenceGuard(10, 100, 3, **g.state())
    assert back.verdict(1e5, 5.0) == g.verdict(1e5, 5.0) is not None  # a resumed guard judges as before
    off = DivergenceGuard(loss_factor=0, grad_factor=0, warmup=0)
    assert off.verdict(1.0, 1.0) is None and off.verdict(1e30, 1e30) is None  # only NaN/inf
    assert DivergenceGuard(check_grad=False).verdict(1.0, float("inf")) is None  # fp16: GradScaler skips it


# --- several processes -----------------------------------------------------------------------


def _launch_two_cpu_ranks(args, cwd):
    """`accelerate launch` with 2 gloo ranks on the CPU (see eqm.train's module doc for why
    --multi_gpu); skips when the launcher is missing; asserts the launch succeeded."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate launcher is not on PATH")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_train_one_model(tmp_path):
    run = tmp_path / "run"
    _launch_two_cpu_ranks(["-m", "eqmctl.cli", "train", str(TINY), *FAST, "train.steps=3", "train.batch_size=2",
                           "--run-dir", str(run)], cwd=tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3
    sums = summary["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1] and summary["replicas_identical"]
    model, _ = C.load_model(run, use_ema=False)
    assert C.weights_checksum(model) == sums[0]
    assert "global batch 4" in (run / "log.txt").read_text()  # 2 per process x 2 processes
    assert (run / "log.txt").read_text().count("done: step 3") == 1  # only the main process writes


SHUTDOWN_PROBE = """
import os, sys, torch
from eqm.recipe import load_recipe
from eqm.distributed import shutdown_distributed
from eqm.train import _build_accelerator
acc = _build_accelerator(load_recipe(sys.argv[1], []), None, print)
torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())  # the first optimizer imports torch._dynamo
acc.wait_for_everyone()
shutdown_distributed()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"rank {acc.process_index} gloo threads {sum('gloo' in n for n in names)}", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_shutdown_joins_the_gloo_threads_before_exit(tmp_path):
    """Gloo worker threads left to interpreter exit can abort a rank that finished (SIGABRT,
    'terminate called without an active exception'); shutdown_distributed must end them."""
    script = tmp_path / "probe.py"
    script.write_text(SHUTDOWN_PROBE)
    proc = _launch_two_cpu_ranks([str(script), str(TINY)], cwd=tmp_path)
    # the two ranks' lines can interleave on the shared stdout
    assert sorted(re.findall(r"rank \d gloo threads \d+", proc.stdout)) == [
        "rank 0 gloo threads 0", "rank 1 gloo threads 0"], proc.stdout


def test_trains_on_real_files_from_a_folder_and_a_probe_manifest(tmp_path):
    """Real MP4s at mixed rates (written by the synthetic source) -> folder dataset and the
    probe-fps manifest -> a short run each, with the clips' real timestamps."""
    from eqm.data.synthetic import SyntheticMotion

    root = tmp_path / "videos"
    SyntheticMotion(num_classes=2, height=16, width=16).write_videos(root, [12, "30000/1001"], seconds=1.0, per_class=2)
    (root / SyntheticMotion(num_classes=2).class_names[0] / "broken.mp4").write_bytes(b"not a video")
    res = runner.invoke(app, ["train", str(TINY), *FAST, "data.source=folder", f"data.root={root}",
                              "data.clips_per_file=3", "--validate"])
    assert res.exit_code == 0, res.output
    assert "12 clips, 2 classes, 1 files skipped" in " ".join(res.output.split())
    assert "warning" in res.output and "broken.mp4" in res.output

    manifest = tmp_path / "m.jsonl"
    res = runner.invoke(app, ["probe-fps", str(root), "--manifest", str(manifest)])
    assert res.exit_code == 1  # the broken file is reported as failed; the manifest is still written
    for source in ("folder", "manifest"):
        run = tmp_path / f"run-{source}"
        res = runner.invoke(app, ["train", str(TINY), *FAST, f"data.source={source}", f"data.root={root}",
                                  f"data.manifest={manifest}", "train.steps=2", "--run-dir", str(run)])
        assert res.exit_code == 0, res.output
        state = json.loads((C.latest_checkpoint(run) / "state.json").read_text())
        assert state["step"] == 2 and state["arch"]["num_classes"] == 2
        assert state["class_names"] == SyntheticMotion(num_classes=2).class_names


@pytest.mark.parametrize("native", [True, False])
def test_auto_mixed_precision_is_bf16_only_where_the_cpu_computes_it(tmp_path, monkeypatch, native):
    from eqm import train as T

    assert T.native_bf16(False) == bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    monkeypatch.setattr(T, "native_bf16", lambda cuda: native)
    lines = []
    res = train(recipe("train.steps=1", "train.mixed_precision=auto"), tmp_path / "run", log=lines.append)
    first = next(line for line in lines if line.startswith("run "))
    assert res.step == 1 and ("(bf16 autocast)" if native else "(float32)") in first


def test_bf16_mixed_precision_runs_under_cpu_autocast_with_float32_weights(tmp_path):
    from eqm import model as M

    seen = []
    real = M.Mlp.forward

    def spy(self, x):
        seen.append(x.dtype)
        return real(self, x)

    M.Mlp.forward = spy
    try:
        train(recipe("train.steps=1"), tmp_path / "fp32", log=quiet)  # one process, two precisions in turn
        res = train(recipe("train.steps=2", "train.mixed_precision=bf16"), tmp_path / "run", log=quiet)
    finally:
        M.Mlp.forward = real
    assert res.step == 2 and torch.bfloat16 in seen  # the blocks ran in bf16
    weights = C.load_weights(res.last_checkpoint / C.MODEL_FILE, "cpu")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    opt = C.load_training_state(res.last_checkpoint)["optimizer"]["state"]
    assert {v["exp_avg"].dtype for v in opt.values()} == {torch.float32}


def test_mixed_precision_resolves_auto_and_drops_fp16_without_a_gpu():
    from eqm.train import native_bf16, resolve_mixed_precision

    assert resolve_mixed_precision("auto", cuda=False) == ("bf16" if native_bf16(False) else "no")
    assert resolve_mixed_precision("fp16", cuda=False) == "no"  # fp16 autocast needs a GPU
    assert [resolve_mixed_precision(s, cuda=False) for s in ("bf16", "no")] == ["bf16", "no"]
    assert resolve_mixed_precision("fp16", cuda=True) == "fp16"
