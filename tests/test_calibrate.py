"""`eqmctl calibrate` and eqm.calibrate: optical-flow motion speed against the data's.

Real files throughout: a photograph panned at a known speed written with PyAV and read back as
training reads it, real checkpoints trained by eqm.train, the real CLI.
"""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eqm.config import SamplerSettings
from eqm.calibrate import calibrate, clip_flow, frame_pairs, measure_clips, measure_dataset
from eqm.data.clips import ClipPolicy, VideoFolderDataset, synthetic_motion
from eqm.data.pan import load_photo, pan_frames
from eqm.data.speed import estimate_velocities
from eqm.errors import EqmError
from eqmctl.cli import app

#: The estimator's documented error (docs/calibration.md, "The flow estimator's own error"):
#: flow ratio vs the centroid tracker's on synthetic discs, and the ratio of a resampled real clip.
CENTROID_AGREEMENT = 0.05
RESAMPLED_RATIO = 0.03


def run(args):
    r = CliRunner().invoke(app, args)
    return r.exit_code, r.stdout, r.stderr


# ----------------------------------------------------------------------------- the estimator


def test_frame_pairs_are_chosen_by_time_not_by_index():
    assert frame_pairs(np.arange(8) / 6.0) == [(i, i + 1) for i in range(7)]
    at60 = frame_pairs(np.arange(12) / 60.0)  # 1/6 s = 10 frames at 60 fps, whatever the frame index
    assert at60 and all(j - i == 10 for i, j in at60)
    assert frame_pairs([0.0]) == []
    # a clip shorter than the gap uses its longest pair
    assert frame_pairs(np.arange(4) / 60.0)[0] == (0, 3)
    # a long clip: at most MAX_PAIRS pairs, spread over it, without a frames x frames table
    long = frame_pairs(np.arange(20000) / 60.0)
    assert len(long) == 8 and long[0] == (0, 10) and long[-1][0] > 19000
    with pytest.raises(EqmError, match="strictly increasing"):
        frame_pairs([0.0, 0.2, 0.1])


def test_flow_ratio_agrees_with_the_centroid_tracker_on_synthetic_discs():
    """Discs moving at 0.5x, 1x and 1.5x the data's speed, at rates from 6 to 60 fps: the flow
    ratio (clip speed over the data's median) matches the centroid tracker's (eqm.data.speed)."""
    policy = ClipPolicy(num_frames=11, fps_min=8, fps_max=30, height=16, width=16)
    data = synthetic_motion(policy, 4)  # the training data: 8 px/s
    rng = np.random.default_rng(0)
    ref_ts = np.arange(11) / 12.0
    ref = measure_clips(data.render_batch([0, 1, 2, 3], ref_ts, [data.random_start(k, rng, duration=ref_ts[-1]) for k in range(4)]), ref_ts)
    ref_speed = float(np.median(ref.speeds))
    assert abs(ref_speed / data.speed(0) - 1) < 0.02
    for factor in (0.5, 1.0, 1.5):
        for fps, n in ((6, 5), (24, 11), (60, 11)):
            ts = np.arange(n) / fps
            motion = synthetic_motion(ClipPolicy(num_frames=n, fps_min=fps, fps_max=fps, height=16, width=16), 4,
                                      speed=factor * data.speed(0))
            clips = motion.render_batch([0, 1, 2, 3], ts, [motion.random_start(k, rng, duration=ts[-1]) for k in range(4)])
            flow = np.median(measure_clips(clips, ts).speeds) / ref_speed
            centroid = float(estimate_velocities(clips, torch.tensor(ts)).norm(dim=1).median()) / data.speed(0)
            assert abs(flow - centroid) < CENTROID_AGREEMENT, (factor, fps, flow, centroid)


def test_direction_share_sees_clips_that_move_the_wrong_way():
    """Each class's reference direction comes from its clips' mean flow; generated discs of the
    right class score 100 %, the same discs played backwards 0 %, a class of mixed directions none."""
    from eqm.calibrate import direction_share, summarize_reference

    policy = ClipPolicy(num_frames=11, fps_min=12, fps_max=12, height=16, width=16)
    data = synthetic_motion(policy, 4)
    rng = np.random.default_rng(1)
    ts = np.arange(11) / 12.0
    labels = np.array([0, 1, 2, 3] * 2)
    clips = data.render_batch(labels, ts, [data.random_start(int(k), rng, duration=ts[-1]) for k in labels])
    ref = summarize_reference(measure_clips(clips, ts, labels), "discs")
    for k in range(4):
        assert np.allclose(ref.class_direction[k], np.sign(data.velocity(k)), atol=0.1), k
    assert direction_share(measure_clips(clips, ts, labels), ref) == 1.0
    assert direction_share(measure_clips(clips.flip(2), ts, labels), ref) == 0.0
    mixed = summarize_reference(measure_clips(clips, ts, np.zeros(8, dtype=np.int64)), "mixed")
    assert mixed.class_direction == {}  # four directions cancel: no class direction to compare with
    assert math.isnan(direction_share(measure_clips(clips, ts, np.zeros(8, dtype=np.int64)), mixed))


def _pan_dataset(tmp_path, velocity=(18.0, 8.0), size=48, fps=60, seconds=2.0, classes=("pan",)):
    """A folder dataset of real 60 fps H.264 files of matplotlib's photograph panned at `velocity`
    px/s (one file per class folder); returns (root, true speed)."""
    from eqm.video.io import write_video

    ts = np.arange(round(fps * seconds)) / fps
    frames = pan_frames(load_photo(), ts, height=size, width=size, velocity=velocity, scale=4.0)
    for name in classes:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        write_video(tmp_path / name / "photo.mp4", frames, fps)
    return tmp_path, math.hypot(*velocity)


def test_a_real_clip_resampled_to_6_12_and_30_fps_keeps_its_speed(tmp_path):
    root, true = _pan_dataset(tmp_path)

    def speed_at(lo, hi, frames):
        policy = ClipPolicy(num_frames=frames, fps_min=lo, fps_max=hi, height=48, width=48)
        ds = VideoFolderDataset(root, policy, seed=0, clips_per_file=3)
        return float(np.median(measure_dataset(ds, 3).speeds))

    ref = speed_at(8, 30, 6)  # the data as training cuts it: real timestamps at 8-30 fps
    assert abs(ref / true - 1) < RESAMPLED_RATIO
    for fps, frames in ((6, 4), (12, 5), (30, 8)):
        assert abs(speed_at(fps, fps, frames) / ref - 1) < RESAMPLED_RATIO, fps


def test_nothing_moving_measures_zero_and_one_frame_nothing():
    still = torch.zeros(3, 6, 16, 16)
    still[:, :, 4:9, 4:9] = 1.0
    s, gap, _ = clip_flow(still, np.arange(6) / 24.0)
    assert s != s or s < 1e-3  # no moving pixel (NaN) or no flow
    s, gap, _ = clip_flow(still[:, :1], [0.0])
    assert math.isnan(s) and math.isnan(gap)
    with pytest.raises(EqmError, match="timestamps"):
        clip_flow(still, [0.0, 0.1])


# ----------------------------------------------------------------------------- the command

SMALL_RECIPE = {
    "name": "t", "data": {"source": "synthetic", "num_frames": 6, "fps_min": 8.0, "fps_max": 30.0, "height": 12, "width": 12,
                          "synthetic": {"num_classes": 3, "length": 64}},
    "train": {"time_shift": 0.0, "seed": 0}, "sample": {"cfg_scale": 1.5},
}


@pytest.fixture
def random_run(tmp_path):
    """A checkpoint on disk of a small random-weight seconds model with a synthetic recipe (no
    training: the command's plumbing does not need a good model)."""
    from eqm import checkpoint as C
    from eqm.config import EqMConfig
    from eqm.model import EqMTransformer

    torch.manual_seed(0)
    m = EqMTransformer(EqMConfig(input_size=12, num_frames=6, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                       class_dropout_prob=0.1, time_mode="seconds"))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    run_dir = tmp_path / "run"
    C.save_checkpoint(run_dir, 5, model=m, ema=m, config=m.config, recipe=SMALL_RECIPE)
    return run_dir


def test_calibrate_command_writes_table_json_and_plot(random_run, tmp_path):
    out = tmp_path / "cal"
    code, stdout, stderr = run(["calibrate", "--ckpt", str(random_run), "--rates", "6,24,60", "--samples", "1",
                                "--ref-clips", "6", "--steps", "2", "--cfg-scales", "1,2", "--per-class", "--out", str(out)])
    assert code == 0, stderr
    assert "guidance 1: worst" in stdout and "guidance 2: worst" in stdout and "median ratio per class" in stdout
    doc = json.loads((out / "calibration.json").read_text())  # strict JSON: NaN would not parse back as null
    assert doc["rates"] == ["6", "24", "60"] and doc["cfg_scales"] == [1.0, 2.0]
    assert len(doc["results"]) == 6 and all(r["clips"] == 3 for r in doc["results"])
    assert doc["reference"]["clips"] == 6 and doc["reference"]["speed"] > 0
    assert set(doc["reference"]["class_speed"]) == {"0", "1", "2"}
    # three directions of the synthetic source: each class has one, and every result a share (or null)
    assert set(doc["reference"]["class_direction"]) == {"0", "1", "2"}
    assert all(r["direction"] is None or 0 <= r["direction"] <= 1 for r in doc["results"])
    assert " %" in stdout  # the table's direction column (its header is cut at 80 columns)
    assert doc["best_cfg_scale"] in (1.0, 2.0) and doc["train_fps"] == [8.0, 30.0]
    assert doc["sampler"]["steps"] == 2 and doc["sampler"]["step_size"] > 0 and doc["weights"] == "ema"
    assert (out / "calibration.png").stat().st_size > 1000
    # the recipe's guidance when none is given, and --json prints the same document
    code, stdout, _ = run(["calibrate", "--ckpt", str(random_run), "--rates", "12", "--samples", "1", "--ref-clips", "3",
                           "--steps", "1", "--json", "--out", str(out)])
    assert code == 0 and json.loads(stdout)["cfg_scales"] == [1.5]


def test_calibrate_measures_another_dataset_given_as_a_folder(random_run, tmp_path):
    """--data FOLDER: real files, cut with the checkpoint's clip policy and resized to the model's
    12 px (a 24 px pan at 19.7 px/s is 9.8 px/s there)."""
    root, true = _pan_dataset(tmp_path / "data", size=24, seconds=1.0, classes=("a", "b", "c"))
    cal = calibrate(random_run, "24", data=root, samples=1, ref_clips=3, sampler=SamplerSettings(steps=1))
    assert cal.reference.data == f"folder {root}" and cal.reference.measured == 3
    assert abs(cal.reference.speed / (true * 12 / 24) - 1) < 0.1


def test_seconds_gives_clips_of_one_duration_at_every_rate(random_run, tmp_path):
    """--seconds 0.5: 3 frames at 6 fps, 30 at 60 fps (the default keeps the 6-frame training clip
    length at every rate, so a 60 fps clip spans a tenth of a second)."""
    out = tmp_path / "cal"
    code, stdout, stderr = run(["calibrate", "--ckpt", str(random_run), "--rates", "6,60", "--samples", "1",
                                "--ref-clips", "3", "--steps", "1", "--seconds", "0.5", "--json", "--out", str(out)])
    assert code == 0, stderr
    assert [r["frames"] for r in json.loads(stdout)["results"]] == [3, 30]
    cal = calibrate(random_run, "60", samples=1, ref_clips=3, sampler=SamplerSettings(steps=1))
    assert [r.frames for r in cal.results] == [6]
    code, _, stderr = run(["calibrate", "--ckpt", str(random_run), "--rates", "6", "--seconds", "0",
                           "--out", str(tmp_path / "bad")])
    assert code == 2 and "--seconds must be a positive" in stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "{tmp}/nothing"], "checkpoint not found"),
    (["--rates", "6,0"], "rates must be positive"),
    (["--rates", "six"], "rates must be a number of frames per second"),
    (["--cfg-scales", "1,x"], "cfg_scales"),
    (["--samples", "0"], "samples must be a positive integer"),
    (["--data", "{tmp}/broken"], "no usable videos"),
    (["--data", "{tmp}/missing.jsonl"], "data not found"),
])
def test_bad_inputs_are_one_line_errors(random_run, tmp_path, args, message):
    broken = tmp_path / "broken" / "a"
    broken.mkdir(parents=True)
    (broken / "x.mp4").write_bytes(b"not a video at all")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--ckpt" not in args:
        args = ["--ckpt", str(random_run)] + args
    code, stdout, stderr = run(["calibrate", *args, "--samples" if "--samples" not in args else "--seed", "1",
                                "--steps", "1", "--out", str(tmp_path / "cal")])
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr and not (tmp_path / "cal").exists()


# ----------------------------------------------------------------------------- trained models

#: 8x8 discs, 4-frame clips at 8-30 fps, two classes (right, left): the smallest setting where
#: 600 steps give discs that move (docs/calibration.md).
TINY = ["data.height=8", "data.width=8", "data.num_frames=4", "data.synthetic.num_classes=2", "model.depth=2",
        "train.batch_size=16", "train.steps=600", "train.warmup_steps=10", "train.ema_decay=0.95",
        "train.preview_every=0", "train.log_every=1000", "train.ckpt_every=1000"]


@pytest.mark.slow  # two 600-step trainings: about a minute of CPU
def test_a_briefly_trained_index_model_speeds_up_with_the_rate(tmp_path):
    """The time-blind baseline makes the same frames at every rate, so its speed in px/s grows with
    the rate; the seconds model trained the same way grows less. Direction only."""
    from eqm.recipe import load_recipe
    from eqm.train import train

    growth = {}
    for mode in ("seconds", "index"):
        recipe = load_recipe("recipes/tiny-synthetic.yaml", TINY + [f"model.time.mode={mode}"])
        train(recipe, tmp_path / mode, log=lambda _l: None)
        cal = calibrate(tmp_path / mode, "6,60", samples=4, ref_clips=16, cfg_scales="1", sampler=SamplerSettings(tol=0.01))
        lo, hi = (r.ratio for r in cal.results)
        growth[mode] = hi / lo
    print(f"speed ratio at 60 fps over 6 fps: {growth}")
    assert growth["index"] > 2.0, growth
    assert growth["index"] > growth["seconds"], growth


def test_the_pan_footage_script_films_mixed_rates_that_move_each_class_its_way(tmp_path):
    """benchmarks/pan_footage.py, the real-footage data of docs/calibration.md: files at their
    stated exact rates in both containers, and each class moves its direction at the set speed
    as the flow estimator reads it through a manifest, as training reads it."""
    from bench_import import load_benchmark

    from eqm.calibrate import summarize_reference
    from eqm.data.clips import ManifestDataset
    from eqm.video.probe import probe_file, write_manifest

    pans = load_benchmark("pan_footage")
    root = tmp_path / "pans"
    assert pans.main(["--out", str(root), "--seconds", "2"]) == 0
    assert pans.main(["--out", str(root)]) == 2  # never films over an existing folder
    results = [probe_file(p) for p in sorted(root.rglob("pan_*"))]
    assert len(results) == 20 and all(r.status == "ok" for r in results)
    assert {r.fps for r in results} == {"8", "12", "15", "24000/1001", "30000/1001"}
    assert {r.container for r in results} == {"mp4", "mkv"}
    write_manifest(results, tmp_path / "pans.jsonl")
    policy = ClipPolicy(num_frames=8, fps_min=4, fps_max=16, height=16, width=16)
    ds = ManifestDataset(tmp_path / "pans.jsonl", policy, seed=0, clips_per_file=2)
    ref = summarize_reference(measure_dataset(ds, 40), "pans")
    assert sorted(ds.class_names) == sorted(pans.DIRECTIONS)
    for k, name in enumerate(ds.class_names):
        assert ref.class_speed[k] == pytest.approx(4.0, rel=0.2), name
        assert np.allclose(ref.class_direction[k], pans.DIRECTIONS[name], atol=0.2), name
