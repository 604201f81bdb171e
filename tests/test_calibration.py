"""Smoke check of the motion-speed calibration pipeline (benchmarks/bench_calibration.py):
train briefly in each mode, sample at rates inside and outside the training range, track the
disc, write the table, JSON and plot.  No accuracy is asserted here: that is the benchmark's job
(docs/calibration.md has the numbers)."""

import json
import math

from bench_import import REPO, load_benchmark


SMALL = ["data.height=16", "data.width=16", "data.num_frames=4", "model.depth=1", "train.batch_size=4",
         "train.log_every=1", "train.ckpt_every=1000", "train.warmup_steps=0"]


def test_calibration_pipeline_runs_end_to_end(tmp_path, capsys):
    bench = load_benchmark("bench_calibration")
    out = tmp_path / "calib"
    code = bench.main(["--steps", "3", "--samples", "1", "--rates", "6,24,60", "--modes", "seconds,index,fps-embed",
                       "--sample-steps", "3", "--cfg-scale", "1.5", "--out", str(out), *SMALL])
    assert code == 0
    printed = capsys.readouterr().out
    assert "median relative speed error" in printed and "worst median error per mode" in printed
    doc = json.loads((out / "results.json").read_text())
    # 4-frame training clips at >= 8 fps span 3/8 s: at 6 fps 3 frames (1/3 s) stay inside, so every
    # rate samples 3 frames (one count for all rates keeps the rows comparable)
    assert doc["rates"] == ["6", "24", "60"] and doc["steps"] == 3
    assert doc["frames"] == {"6": 3, "24": 3, "60": 3}
    assert doc["sampler"]["cfg_scale"] == 1.5 and doc["sampler"]["steps"] == 3
    for mode in ("seconds", "index", "fps-embed"):
        for rate in doc["rates"]:
            res = doc["results"][mode][rate]
            assert res["n"] == 4 and len(res["rows"]) == 4  # one clip per class
            assert all(math.isfinite(r["est"]) and r["true"] > 0 for r in res["rows"])
        assert (out / mode / "checkpoints").is_dir()
    # the estimator on real synthetic clips recovers the true speed (its own floor)
    assert all(doc["results"]["data"][r]["median_error"] < 0.05 for r in doc["rates"])
    assert (out / "calibration.png").stat().st_size > 1000
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| fps |") and len(table) == 2 + 3 and table[3].startswith("| 24 (train) |")

    # a second run reuses the finished runs instead of training again; --frames-per-rate gives each
    # rate the clip `eqmctl sample` makes by default: 4 frames at 12 fps, 3 at 6 fps
    # (a different sample.cfg_scale does not make it train again: sampling settings aside, same recipe)
    code = bench.main(["--steps", "3", "--samples", "1", "--rates", "6,12", "--modes", "index", "--frames-per-rate",
                       "--sample-steps", "2", "--out", str(out), *SMALL, "sample.cfg_scale=2"])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["train_seconds"]["index"] == 0.0 and doc["frames"] == {"6": 3, "12": 4}
    assert doc["sampler"]["cfg_scale"] == 2.0  # the recipe's guidance when --cfg-scale is not given
    assert "sampling 3/4 frames at" in capsys.readouterr().out


def test_calibration_rejects_bad_arguments(tmp_path, capsys):
    bench = load_benchmark("bench_calibration")
    assert bench.main(["--modes", "frames", "--out", str(tmp_path / "c")]) == 2
    assert bench.main(["--rates", "0", "--out", str(tmp_path / "c")]) == 2
    assert bench.main(["--frames", "5", "--frames-per-rate", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "unknown mode 'frames'" in err and "--rates" in err and "exclude each other" in err
    assert not (tmp_path / "c").exists()
