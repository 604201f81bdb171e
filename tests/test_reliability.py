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
from eqm.config import EqMConfig, SamplerSettings
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
        run_sampler(model, (2, 3, 4, 8, 8), torch.arange(4) / 12.0, settings=SamplerSettings(tol=0.5, steps=5))
    assert e.value.exit_code == 1


def test_json_written_is_always_valid_json(tmp_path):
    from eqm.generate import Generation, write_generation
    from eqm.jsonio import dumps
    from fractions import Fraction

    assert strict_json(dumps({"a": [float("nan"), 1.5, float("-inf")], "b": (float("inf"),)})) == \
        {"a": [None, 1.5, None], "b": [None]}
    gen = Generation(videos=torch.zeros(1, 3, 2, 8, 8), labels=None, evals=torch.tensor([3]),
                     final_rms=torch.tensor([float("nan")]), timestamps=torch.tensor([0.0, 0.5]), fps=Fraction(2))
    summary = write_generation(gen, tmp_path / "out", fmt="gif")
    doc = strict_json(summary.manifest.read_text())
    assert doc["samples"][0]["final_rms"] is None and doc["settings"]["tol"] == 0.01


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_non_float_weights_are_refused(tmp_path, dtype):
    ck = save_ckpt(tmp_path / "run", tiny_model())
    poison(ck, lambda k, v: v.to(dtype) if k == "final_layer.linear.bias" else v)
    code, _, err = run(["sample", "--fps", 12, "--ckpt", ck, "--out", tmp_path / "o", "-N", 1, "--steps", 1])
    assert code == 2
    one_line_error(err, "final_layer.linear.bias", "floating point")


# ------------------------------------------------------------------------------------------------
# 7. YAML: alias bombs and deep nesting are refused fast, messages stay short


TINY_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny-synthetic.yaml"


def _bomb(levels: int = 9) -> str:
    text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    return text + f"model:\n  size: *a{levels - 1}\n"  # under a known key: 10**9 values


@pytest.mark.parametrize("text, message", [
    (_bomb(), "expands to more than"),
    ("model: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than"),
    ("".join("  " * i + f"k{i}:\n" for i in range(400)), "nested more than"),
    ("x: &x [[[[[[[[[[1]]]]]]]]]]\ny: &y [[[[[[[[[[*x]]]]]]]]]]\nz: &z [[[[[[[[[[*y]]]]]]]]]]\nmodel: [*z]\n",
     "once aliases are expanded"),
    ("model: &m [*m]\n", "refers to the node containing it"),
    ("model: !!python/object/apply:os.system [echo owned]\n", "not valid YAML"),  # tags never run code
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
])
def test_hostile_yaml_is_refused_in_one_short_line(tmp_path, text, message):
    rp = tmp_path / "r.yaml"
    rp.write_text(text)
    code, _, err = run(["train", rp, "--validate"])
    assert code == 2
    one_line_error(err, str(rp), message)
    assert len(err) < 400


def test_huge_values_are_not_formatted_into_messages(tmp_path):
    rp = tmp_path / "r.yaml"
    rp.write_text("train:\n  lr: [" + ", ".join(["1"] * 50000) + "]\nname: " + "n" * 200000 + "\n")
    code, _, err = run(["train", rp, "--validate"])
    assert code == 2 and len(err) < 400
    code, _, err = run(["train", TINY_RECIPE, "--validate", "train.lr=[&a [1,1,1,1,1,1,1,1,1,1], "
                        + ", ".join(["*a"] * 20000) + "]"])
    assert code == 2 and "expands to more than" in err and len(err) < 400


# ------------------------------------------------------------------------------------------------
# 8 / 9. bad values: one line, before any work; sizes estimated before allocating


@pytest.mark.parametrize("override, message", [
    ("model.hidden_size=1000000", "of float32 weights"),
    ("model.depth=10000000", "of float32 weights"),
    ("train.batch_size=100000000", "needs about"),
    ("train.preview_samples=100000000", "needs about"),
    ("train.lr=1e39", "train.lr must be in (0, 1]"),
    ("train.preview_fps=1e-9", "below the supported minimum"),
])
def test_recipe_values_past_sane_bounds(override, message):
    code, _, err = run(["train", TINY_RECIPE, "--validate", override])
    assert code == 2
    one_line_error(err, message)


def test_huge_frames_are_refused_with_an_estimate():
    code, _, err = run(["train", TINY_RECIPE, "--validate", "data.height=20000", "data.width=20000",
                        "model.patch_size=1"])
    assert code == 2
    one_line_error(err)
    # 95 GiB of weights: refused for its weights on a smaller machine, for its tokens on any
    assert "this machine has" in err or "tokens per clip" in err


def test_sample_request_checked_before_sampling(tmp_path):
    ck = save_ckpt(tmp_path / "run", tiny_model())
    out = tmp_path / "out"
    base = ["sample", "--ckpt", ck, "--out", out, "--steps", 1]
    for args, message in (
        (["--fps", "1e-9"], "below the supported minimum"),
        (["--fps", 12, "--num-samples", -2], "--num-samples must be an integer >= 1"),
        (["--fps", 12, "--upscale", 0], "--upscale must be an integer between 1 and 64"),
        (["--fps", 12, "--cfg-scale", -5], "--cfg-scale must be >= 0"),
        (["--fps", 12, "--device", "meta"], "cpu or cuda"),
        (["--fps", 12, "--dtype", "xyz"], "--dtype must be fp32, bf16 or fp16"),
    ):
        code, _, err = run(base + args)
        assert code == 2, (args, err)
        one_line_error(err, message)
        assert not out.exists()


def test_sample_with_too_many_tokens_is_refused(tmp_path):
    """`sample --frames 4096` is within the frame cap, but with 64 tokens a frame it is 262144 tokens
    of attention: refused at once (eqm.budget.MAX_TOKENS_CPU on a CPU) instead of not finishing a step."""
    from eqm import budget
    from eqm.generate import generate

    torch.manual_seed(0)
    model = EqMTransformer(EqMConfig(**{**ARCH, "input_size": 32}))  # 8 x 8 = 64 tokens a frame
    ck = save_ckpt(tmp_path / "run", model)
    code, _, err = run(["sample", "--fps", 12, "--ckpt", ck, "--out", tmp_path / "o", "--frames", 4096, "-N", 1])
    assert code == 2
    one_line_error(err, "262144 tokens per clip", str(budget.MAX_TOKENS_CPU))
    assert not (tmp_path / "o").exists()
    with pytest.raises(EqmError, match="tokens per clip"):
        generate(model, fps=12, num_frames=budget.MAX_TOKENS_CPU // 64 + 1, num_samples=1, settings=SamplerSettings(steps=1))


@pytest.mark.parametrize("change, message", [
    ({"step": "abc"}, "'step' must be an integer >= 0"),
    ({"step": -5}, "'step' must be an integer >= 0"),
    ({"class_names": 5}, "'class_names' must be a list of strings"),
    ({"arch": [1, 2]}, "'arch' must be a mapping"),
    ({"arch": {"num_classes": -3}}, "num_classes must be an integer >= 0"),
    ({"arch": {"hidden_size": 10 ** 7, "num_heads": 1}}, "of float32 weights"),
    ({"arch": {"depth": "4"}}, "depth must be an integer"),
])
def test_state_json_contents_are_validated(tmp_path, change, message):
    ck = save_ckpt(tmp_path / "run", tiny_model())
    state = json.loads((ck / C.STATE_FILE).read_text())
    for k, v in change.items():
        state[k] = {**state["arch"], **v} if k == "arch" and isinstance(v, dict) else v
    (ck / C.STATE_FILE).write_text(json.dumps(state))
    code, _, err = run(["sample", "--fps", 12, "--ckpt", ck, "--out", tmp_path / "o", "-N", 1, "--steps", 1])
    assert code == 2
    one_line_error(err, message)


def test_state_json_not_utf8(tmp_path):
    ck = save_ckpt(tmp_path / "run", tiny_model())
    (ck / C.STATE_FILE).write_bytes(b'{"step": 1, "arch": {}, "x": "\xff\xfe"}')
    code, _, err = run(["sample", "--fps", 12, "--ckpt", ck, "--out", tmp_path / "o"])
    assert code == 2
    one_line_error(err, "not UTF-8")


def test_optim_pt_refusals_say_what_was_refused(tmp_path):
    import pickle

    ck = save_ckpt(tmp_path / "run", tiny_model())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    for protocol, refused in ((2, "system"), (4, "Unsupported operand")):
        with open(ck / C.OPTIM_FILE, "wb") as f:
            pickle.dump({"optimizer": Evil()}, f, protocol=protocol)
        with pytest.raises(EqmError) as e:
            C.load_training_state(ck)
        text = str(e.value)
        assert "refused" in text and refused in text and "\n" not in text
        assert "weights_only` set to `False`" not in text and "file an issue" not in text
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "scheduler": 3, "rng": {}}, ck / C.OPTIM_FILE)
    with pytest.raises(EqmError, match="'scheduler' must be a mapping"):
        C.load_training_state(ck)
    torch.save([1, 2], ck / C.OPTIM_FILE)
    with pytest.raises(EqmError, match="expected a mapping"):
        C.load_training_state(ck)


def test_os_errors_are_one_line_naming_the_path(tmp_path, monkeypatch):
    import errno

    ck = save_ckpt(tmp_path / "run", tiny_model())
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["sample", "--fps", 12, "--ckpt", ck, "-N", 1, "--steps", 1, "--format", "gif"]
    code, _, err = run(args + ["--out", blocker / "out"])
    assert code == 2
    one_line_error(err, "Not a directory", str(blocker / "out"))
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run(args + ["--out", locked / "out"])
        assert code == 2
        one_line_error(err, "ermission denied", str(locked / "out"))

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", full)  # every atomic write ends in os.replace
    code, _, err = run(args + ["--out", tmp_path / "out"])
    assert code in (1, 2)  # the video writer reports it as its own one-line error (2)
    one_line_error(err, "No space left on device", str(tmp_path / "out"))
    monkeypatch.undo()

    def full_json(path, obj, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    import eqm.generate

    monkeypatch.setattr(eqm.generate.fsio, "write_json", full_json)  # an OS error nobody converts
    code, _, err = run(args + ["--out", tmp_path / "out2"])
    assert code == 1
    one_line_error(err, "No space left on device", "samples.json")


def test_internal_errors_have_their_own_exit_code(monkeypatch, two_videos):
    """probe-fps: 1 means a file is broken; a crash of the tool itself is exit 3, one line."""
    import eqm.video.probe as probe

    def crash(*a, **k):
        raise TypeError("simulated bug")

    monkeypatch.setattr(probe, "probe_paths", crash)
    code, _, err = run(["probe-fps", two_videos[0]])
    assert code == 3
    one_line_error(err, "internal error", "TypeError: simulated bug")


# ------------------------------------------------------------------------------------------------
# 6. folder datasets: symlinks never relabel or duplicate a video


def test_folder_dataset_symlinks_never_relabel_or_duplicate(tmp_path):
    from eqm.data.clips import ClipPolicy, DataWarning, VideoFolderDataset

    root = tmp_path / "data"
    for cls, n in (("cats", 2), ("dogs", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            tiny_video(root / cls / f"{cls}{i}.mp4", frames=6)
    outside = tiny_video(tmp_path / "elsewhere.mp4", frames=6)
    (root / "cats" / "more").symlink_to(root / "dogs", target_is_directory=True)  # a folder link into a class
    (root / "cats" / "dog0.mp4").symlink_to(root / "dogs" / "dogs0.mp4")  # a file link to another class's video
    os.link(root / "dogs" / "dogs1.mp4", root / "cats" / "hard.mp4")  # the same file, hard linked
    (root / "cats" / "outside.mp4").symlink_to(outside)  # a link to a video outside the tree: a cat
    (root / "dogs" / "loop").symlink_to(root, target_is_directory=True)
    policy = ClipPolicy(num_frames=4, fps_min=6, fps_max=12, height=16, width=16)
    with pytest.warns(DataWarning) as caught:
        ds = VideoFolderDataset(root, policy, seed=0)
    text = " ".join(str(w.message) for w in caught)
    assert "symlinked folder" in text and "used once" in text
    labels = {Path(s.path).name: ds.class_names[s.label] for s in ds.sources}
    # the hard-linked pair is one file with two plain names: kept once, under the first class
    assert sorted(labels) == ["cats0.mp4", "cats1.mp4", "dogs0.mp4", "dogs2.mp4", "hard.mp4", "outside.mp4"]
    assert {k for k, v in labels.items() if v == "dogs"} == {"dogs0.mp4", "dogs2.mp4"}
    assert len({os.path.realpath(s.path) for s in ds.sources}) == len(ds.sources)


# ------------------------------------------------------------------------------------------------
# 10. a damaged newest checkpoint: sample and --resume latest fall back to the one before


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    model = tiny_model()
    old = C.save_checkpoint(run_dir, 10, model=model, ema=model, config=model.config, recipe={"name": "t"},
                            optimizer_state={"optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
                                             "rng": C.rng_state()})
    new = save_ckpt(run_dir, model, step=20)
    (new / C.MODEL_FILE).write_bytes(b"\x00" * 100)  # cut short on a bad disk
    code, _, err = run(["sample", "--fps", 12, "--ckpt", run_dir, "--out", tmp_path / "out", "-N", 1,
                        "--steps", 1, "--format", "gif"])
    assert code == 0, err
    assert "skipping unreadable checkpoint" in err and str(new) in err
    assert json.loads((tmp_path / "out" / "samples.json").read_text())["checkpoint"] == str(old)
    # resuming also needs optim.pt: the newest without a readable one is passed over
    (new / C.MODEL_FILE).write_bytes((old / C.MODEL_FILE).read_bytes())
    (new / C.OPTIM_FILE).write_bytes(b"garbage")
    warned = []
    assert C.latest_readable(run_dir, training=True, warn=warned.append) == old
    assert "training state" in warned[0] and str(new) in warned[0]
    assert C.resolve_checkpoint(run_dir) == new  # without warn: the newest, as before
    with pytest.raises(EqmError, match="cannot read weights"):  # a checkpoint named explicitly: no fallback
        (old / C.EMA_FILE).write_bytes(b"")
        C.load_model(old)


def test_retime_opens_protocol_names_as_files(tmp_path, monkeypatch):
    """`retime pipe:0` must not read stdin, `tcp:...` must not open a socket: names are files."""
    monkeypatch.chdir(tmp_path)
    for name in ("pipe:0", "tcp:127.0.0.1:9"):
        code, _, err = run(["retime", name, "--fps", 24, "--out", "o.mp4"])
        assert code == 2
        one_line_error(err, "not found", name)
    os.rename(tiny_video(tmp_path / "v.mp4", frames=6), tmp_path / "pipe:0")  # a real file of that name is read
    code, _, err = run(["retime", "pipe:0", "--fps", 24, "--out", "o.mp4"])
    assert code == 0, err
    assert (tmp_path / "o.mp4").is_file()


def test_inspect_embed_sizes_are_bounded(tmp_path):
    for args, message in ((["--hidden-size", 10_000_008], "of float32 weights"),  # the architecture's own budget
                          (["--rates", 1000, "--compare", "1000,999", "--seconds", 60], "60000 frames")):
        code, _, err = run(["inspect-embed", "--out", tmp_path / "o"] + args)
        assert code == 2
        one_line_error(err, message)
        assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# 9. retime --mode speed streams: one decoded frame in flight, whatever the input's length


def test_retime_speed_streams_frame_by_frame(tmp_path, monkeypatch):
    import contextlib

    import eqm.video.io as vio
    from eqm.retime import retime_video

    src = tmp_path / "in.mp4"
    arr = np.zeros((30, 16, 16, 3), np.uint8)
    arr[:, :, :, 0] = np.arange(30, dtype=np.uint8)[:, None, None] * 8
    write_video(src, arr, 24)
    decoded, in_flight = [0], []
    real_open, real_write = vio.open_frames, vio.write_video

    @contextlib.contextmanager
    def counting_open(path):
        with real_open(path) as reader:
            inner = reader.frames

            def counted():
                for item in inner:
                    decoded[0] += 1
                    yield item
            reader.frames = counted()
            yield reader

    def checking_write(path, frames, fps, **kw):
        assert not isinstance(frames, np.ndarray)  # the writer gets a stream, not a decoded array
        def consumed():
            for k, frame in enumerate(frames):
                in_flight.append(decoded[0] - k)
                yield frame
        return real_write(path, consumed(), fps, **kw)

    monkeypatch.setattr(vio, "open_frames", counting_open)
    monkeypatch.setattr(vio, "write_video", checking_write)
    monkeypatch.setattr(vio, "read_video", lambda *a, **k: pytest.fail("speed mode decoded the whole input"))
    res = retime_video(src, tmp_path / "fast.mp4", 48, "speed")
    assert res.frames_in == res.frames_out == 30 and max(in_flight) == 1
    assert res.duration_out == pytest.approx(30 / 48)
    monkeypatch.undo()
    back = vio.read_video(tmp_path / "fast.mp4")
    assert back.frames.shape[0] == 30 and back.fps == 48
    red = back.frames[:, :, :, 0].astype(int).mean(axis=(1, 2))
    assert np.all(np.diff(red) > 0)  # every frame, in order (the codec is lossy: levels within a few steps)


def test_retime_model_mode_names_a_broken_checkpoint(tmp_path):
    ck = save_ckpt(tmp_path / "run", tiny_model())
    poison(ck, lambda k, v: v.clone().fill_(3e38) if "adaLN" in k or "final_layer" in k else v)
    src = tiny_video(tmp_path / "in.mp4", frames=6)
    code, _, err = run(["retime", src, "--fps", 24, "--mode", "model", "--ckpt", ck, "--steps", 2,
                        "--out", tmp_path / "out.mp4"])
    assert code == 1
    one_line_error(err, f"checkpoint {ck}", "not finite")
    assert not (tmp_path / "out.mp4").exists()


def test_probe_lists_each_video_once_under_its_real_folder(tmp_path):
    from eqm.video.probe import collect_videos

    root = tmp_path / "data"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        tiny_video(root / cls / f"{cls}0.mp4")
    (root / "cats" / "more").symlink_to(root / "dogs", target_is_directory=True)  # sorts before dogs
    (root / "cats" / "again.mp4").symlink_to(root / "dogs" / "dogs0.mp4")
    extra = tmp_path / "extra"
    extra.mkdir()
    tiny_video(extra / "x.mp4")
    (root / "linked").symlink_to(extra, target_is_directory=True)  # a folder only reachable by a link
    files = collect_videos([root])
    assert sorted(str(f.relative_to(root)) for f in files) == ["cats/cats0.mp4", "dogs/dogs0.mp4", "linked/x.mp4"]
    mp = tmp_path / "m.jsonl"
    assert run(["probe-fps", "--manifest", mp, root])[0] == 0
    assert sorted(r.label for r in read_manifest(mp)) == ["cats", "dogs", "linked"]


def test_an_output_folder_that_is_a_file_is_one_line_and_the_file_stays(tmp_path):
    """--out / --run-dir naming an existing file: one `error:` line, exit 2, the file untouched
    (Click's own folder check printed a multi-line usage box)."""
    from tests.test_sample import make_model, save_run

    ckpt = save_run(tmp_path / "runs" / "r", make_model())
    target = tmp_path / "file"
    target.write_text("keep")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: 1}\n")
    for args in (["sample", "--ckpt", str(ckpt), "--fps", "24", "--out", str(target)],
                 ["inspect-embed", "--out", str(target)],
                 ["train", str(recipe), "--run-dir", str(target)]):
        r = CliRunner().invoke(app, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (args, r.output)
        assert str(target.name) in lines[0] and target.read_text() == "keep"
