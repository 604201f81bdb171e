"""Official EqM checkpoints: safe loading, and initialising video models from image weights."""

import argparse
import os
from dataclasses import replace

import pytest
import torch

from eqm import checkpoint as C
from eqm.adapt import adapt_state_dict, init_from
from eqm.embed import sincos_grid_2d
from eqm.errors import EqmError
from eqm.config import EqMConfig, SamplerSettings
from eqm.model import EqMTransformer
from eqm.official import load_official_model, load_weights_from, read_official

# Our model in image mode at a tiny size, in the official layout (4 latent channels,
# learn_sigma, a null-class row): args say EqM-tiny/2 at 64 px, i.e. 8x8 latents.
IMAGE = dict(input_size=8, in_channels=4, num_frames=1, learn_sigma=True, num_classes=10, pos="sincos")


def image_model(seed=0, **kw):
    """The image model with every weight random (zero-initialised layers too), in eval mode."""
    torch.manual_seed(seed)
    m = EqMTransformer(EqMConfig.from_size("tiny", **{**IMAGE, **kw}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def official_args(**kw):
    return argparse.Namespace(**{"model": "EqM-tiny/2", "image_size": 64, "num_classes": 10, "ebm": "none",
                                 "uncond": True, "vae": "ema", "global_batch_size": 256, **kw})


def write_official(path, model, args=None, raw=None):
    """torch.save of {model, ema, opt, args} as the official train.py writes it."""
    raw = raw if raw is not None else {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-4)
    torch.save({"model": raw, "ema": model.state_dict(), "opt": opt.state_dict(),
                "args": args if args is not None else official_args()}, path)
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    img = image_model()
    return img, write_official(tmp_path_factory.mktemp("official") / "0001400.pt", img)


def video_model(**kw):
    torch.manual_seed(1)
    return EqMTransformer(EqMConfig.from_size("tiny", **{**IMAGE, "num_frames": 4, **kw})).eval()


def same(a, b):
    return torch.equal(a, b) or torch.allclose(a, b, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ loading


def test_official_pt_loads_its_ema_weights_and_args(official):
    img, path = official
    model, loaded = load_official_model(path)
    assert loaded.kind == "official" and loaded.weights == "ema" and loaded.args["model"] == "EqM-tiny/2"
    c = model.config
    assert (c.hidden_size, c.depth, c.num_heads, c.patch_size) == (64, 4, 4, 2)
    assert (c.in_channels, c.input_size, c.num_classes, c.learn_sigma) == (4, (8, 8), 10, True)
    assert C.weights_checksum(model) == C.weights_checksum(img)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 10])
    assert torch.equal(model(x, None, y), img(x, None, y))
    raw = read_official(path, weights="model")
    assert raw.weights == "model" and all(not v.any() for v in raw.state_dict.values())


def test_official_args_must_agree_with_the_weights(tmp_path):
    img = image_model()
    with pytest.raises(EqmError, match="EqM-XL/2 .*hidden size of 1152.* 64"):
        read_official(write_official(tmp_path / "a.pt", img, official_args(model="EqM-XL/2")))
    with pytest.raises(EqmError, match="image_size 256 .*32x32 latents.*8x8"):
        read_official(write_official(tmp_path / "b.pt", img, official_args(image_size=256)))
    with pytest.raises(EqmError, match="args.model 'Foo-1' is not"):
        read_official(write_official(tmp_path / "c.pt", img, official_args(model="Foo-1")))


def test_official_args_that_are_not_numbers_are_one_line_errors(tmp_path):
    img = image_model()
    for key, bad in (("image_size", "large"), ("num_classes", "ten"), ("image_size", 64.5), ("num_classes", [10])):
        with pytest.raises(EqmError, match=f"args.{key} must be an integer"):
            read_official(write_official(tmp_path / f"{key}.pt", img, official_args(**{key: bad})))
    assert read_official(write_official(tmp_path / "ok.pt", img, official_args(image_size="64"))).kind == "official"


def test_init_from_checks_the_weights_it_loads(tmp_path):
    """NaN weights in an official file are refused by init_from, as by every other loader."""
    img = image_model()
    poisoned = {k: v.clone() for k, v in img.state_dict().items()}
    poisoned["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"model": poisoned, "ema": poisoned, "args": official_args()}, path)
    with pytest.raises(EqmError, match="blocks.0.mlp.fc1.weight"):
        init_from(video_model(), path)


def test_bare_state_dict_and_energy_args(tmp_path):
    img = image_model()
    torch.save(img.state_dict(), tmp_path / "bare.pt")
    loaded = read_official(tmp_path / "bare.pt")
    assert loaded.weights == "file" and "bare state dict" in loaded.notes[0] and loaded.arch["num_heads"] == 4
    loaded = read_official(write_official(tmp_path / "e.pt", img, official_args(ebm="mean", uncond=False)))
    assert loaded.arch["energy"] == "dot" and any("uncond=False" in n for n in loaded.notes)


class _Marker:
    """Unpickling this would create a file: the attack a weights_only load must refuse."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("where", ["args", "ema"])
def test_a_malicious_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    img = image_model()
    payload = {"model": img.state_dict(), "ema": img.state_dict(), "opt": {}, "args": official_args()}
    payload[where] = _Marker(str(marker)) if where == "args" else {**img.state_dict(), "x": _Marker(str(marker))}
    torch.save(payload, tmp_path / "evil.pt")
    assert not marker.exists()
    for load in (read_official, load_weights_from, load_official_model):
        with pytest.raises(EqmError, match=r"refused to load .*evil.pt: the file asks to run 'io.open'.*nothing in it was executed"):
            load(tmp_path / "evil.pt")
    model = video_model()
    with pytest.raises(EqmError, match="refused"):
        init_from(model, tmp_path / "evil.pt")
    assert not marker.exists()


def test_unreadable_and_missing_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EqmError, match="cannot read .*junk.pt"):
        read_official(tmp_path / "junk.pt")
    with pytest.raises(EqmError, match="weights not found"):
        load_weights_from(tmp_path / "nope.pt")
    with pytest.raises(EqmError, match="weights must be one of ema, model"):
        load_weights_from(tmp_path / "junk.pt", weights="best")


# ------------------------------------------------------------------------------ init_from


def test_t1_forward_of_the_initialised_video_model_equals_the_image_model(official):
    img, path = official
    video = video_model()
    report = init_from(video, path)
    assert report.keys("adapted") == [] and report.keys("new") == [] and report.warnings == []
    assert len(report.keys("loaded")) == len(video.state_dict())
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 7, 10])
    out = video(x.unsqueeze(2), torch.tensor([[0.0], [0.5], [2.0]]), y).squeeze(2)
    assert torch.equal(out, img(x, None, y))
    text = "\n".join(report.lines())
    assert "loaded" in text and "blocks.* (40)" in text and str(path) in text


def test_model_weights_instead_of_ema(official):
    _, path = official
    video = video_model()
    report = init_from(video, path, weights="model")
    assert report.weights == "model" and not video.blocks[0].attn.qkv.weight.any()


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_temporal_patch_inflates_the_patch_kernel(official, learn_sigma):
    img, path = official
    video = video_model(temporal_patch=2, learn_sigma=learn_sigma)
    report = init_from(video, path)
    assert set(report.keys("adapted")) == {"x_embedder.proj.weight", "final_layer.linear.weight", "final_layer.linear.bias"}
    frame = torch.randn(2, 4, 8, 8)
    static = frame.unsqueeze(2).expand(-1, -1, 2, -1, -1)  # two equal frames
    assert same(video.x_embedder(static), img.x_embedder(frame.unsqueeze(2)))
    # the output layer repeats the image's per-frame prediction over both frames of a token
    # (without learn_sigma the head has as many rows as the image's sigma head: the layout decides)
    w = video.final_layer.linear.weight.reshape(2, 4, -1, 64)
    image_w = img.final_layer.linear.weight.reshape(4, 8, 64)[:, : w.shape[2]]
    assert torch.equal(w[0], w[1]) and torch.equal(w[0], image_w)
    clip = torch.randn(1, 4, 2, 8, 8)
    assert video(clip).shape == clip.shape


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_learn_sigma_heads_kept_or_dropped(official, learn_sigma):
    img, path = official
    video = video_model(learn_sigma=learn_sigma)
    report = init_from(video, path)
    assert ("final_layer.linear.weight" in report.keys("adapted")) == (not learn_sigma)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    assert torch.equal(video(x.unsqueeze(2), None, y).squeeze(2), img(x, None, y))
    # and back: a sigma-less source into a learn_sigma model gets a zero sigma half
    if not learn_sigma:
        target = video_model(learn_sigma=True)
        sd, rep = adapt_state_dict(video.state_dict(), target, src_classes=10)
        assert "sigma half added as zeros" in dict((k, h) for _, k, h in rep.entries)["final_layer.linear.weight"]
        assert not sd["final_layer.linear.weight"].reshape(4, 8, 64)[:, 4:].any()


def test_fps_embed_starts_as_the_image_model(official):
    img, path = official
    video = video_model(time_mode="fps-embed")
    report = init_from(video, path)
    assert sorted(report.keys("new")) == [f"fps_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([4, 10])
    assert torch.equal(video(x.unsqueeze(2), torch.zeros(2, 1), y).squeeze(2), img(x, None, y))
    clip = torch.randn(1, 4, 4, 8, 8)  # any rate: the fps embedding adds exactly 0
    a = video(clip, torch.arange(4.0)[None] / 8, torch.tensor([1]))
    b = video(clip, torch.arange(4.0)[None] / 60, torch.tensor([1]))
    assert torch.equal(a, b)


def test_divided_attention_starts_as_the_image_model_on_every_frame(official):
    img, path = official
    video = video_model(attention="divided")
    report = init_from(video, path)
    new = report.keys("new")
    assert new and all(".temporal_attn." in k for k in new) and len(new) == 4 * video.config.depth
    assert all(torch.count_nonzero(b.temporal_attn.proj.weight) == 0 for b in video.blocks)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([4, 10])
    assert same(video(x.unsqueeze(2), torch.zeros(2, 1), y).squeeze(2), img(x, None, y))
    clip = x[:1].unsqueeze(2).repeat(1, 1, 4, 1, 1)  # four copies of one image, at any rate
    out = video(clip, torch.arange(4.0)[None] / 8, y[:1])
    assert same(out[:, :, 0], img(x[:1], None, y[:1]))
    # and back: a divided model's weights into a full one drop the attention across frames
    back = EqMTransformer(EqMConfig.from_size("tiny", **{**IMAGE, "num_frames": 4}))
    sd, rep = adapt_state_dict(video.state_dict(), back)
    assert sorted(rep.keys("dropped")) == sorted(new)


def test_rope_model_has_no_pos_embed_to_load(official):
    _, path = official
    video = video_model(pos="rope")
    report = init_from(video, path)
    assert report.keys("dropped") == ["pos_embed"] and "pos_embed" not in video.state_dict()
    assert torch.equal(video.blocks[2].mlp.fc1.weight, load_weights_from(path).state_dict["blocks.2.mlp.fc1.weight"])
    # and back: a RoPE model's weights into a sincos model get the fixed table computed
    _, rep = adapt_state_dict(video.state_dict(), video_model(), src_classes=10)
    assert rep.keys("new") == ["pos_embed"]


def test_other_class_count_reinitialises_labels_and_keeps_the_null_row(official):
    img, path = official
    video = video_model(num_classes=5)
    fresh = video.y_embedder.embedding_table.weight.detach().clone()
    report = init_from(video, path)
    assert report.keys("adapted") == ["y_embedder.embedding_table.weight"]
    assert len(report.warnings) == 1 and "model.num_classes is 5" in report.warnings[0] and "10 classes" in report.warnings[0]
    table = video.y_embedder.embedding_table.weight
    assert torch.equal(table[:5], fresh[:5]) and torch.equal(table[5], img.y_embedder.embedding_table.weight[10])
    x = torch.randn(2, 4, 8, 8)  # unconditional (null-label) output is the image model's
    assert torch.equal(video(x.unsqueeze(2), None, torch.tensor([5, 5])).squeeze(2), img(x, None, torch.tensor([10, 10])))


def test_unconditional_model_keeps_only_the_null_row(official):
    img, path = official
    video = video_model(num_classes=0)
    report = init_from(video, path)
    assert "null-class row kept" in dict((k, h) for _, k, h in report.entries)["y_embedder.embedding_table.weight"]
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(video(x.unsqueeze(2)).squeeze(2), img(x, None, torch.tensor([10, 10])))


def test_other_input_size_recomputes_the_sincos_table(official):
    _, path = official
    video = video_model(input_size=16)
    report = init_from(video, path)
    assert report.keys("new") == ["pos_embed"]
    assert torch.equal(video.pos_embed[0], sincos_grid_2d(64, 8, 8))


@pytest.mark.parametrize("kw, key", [
    (dict(hidden_size=128, num_heads=4), "x_embedder.proj.weight"),
    (dict(in_channels=3), "x_embedder.proj.weight"),
    (dict(patch_size=4), "x_embedder.proj.weight"),
    (dict(depth=6), "blocks.4.norm1"),
])
def test_shapes_that_cannot_be_adapted_name_the_key(official, kw, key):
    _, path = official
    video = video_model(**kw)
    before = C.weights_checksum(video)
    with pytest.raises(EqmError) as e:
        init_from(video, path)
    msg = str(e.value)
    assert "\n" not in msg and (f"'{key}" in msg or "blocks.4." in msg)
    assert C.weights_checksum(video) == before  # nothing half-loaded


def test_deeper_checkpoint_is_an_error_naming_the_extra_key(official):
    _, path = official
    with pytest.raises(EqmError, match=r"'blocks.3.[\w.]+' in the checkpoint has no place in the model"):
        init_from(video_model(depth=3), path)


def test_init_from_an_eqmctl_run_directory_and_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    src = EqMTransformer(EqMConfig.from_size("tiny", input_size=8, in_channels=4, num_frames=4, num_classes=3, time_mode="fps-embed"))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    ema = EqMTransformer(EqMConfig.from_size("tiny", input_size=8, in_channels=4, num_frames=4, num_classes=3, time_mode="fps-embed"))
    C.save_checkpoint(tmp_path / "run", 5, model=src, ema=ema, config=src.config, recipe={})
    video = video_model(num_classes=3, learn_sigma=False)
    report = init_from(video, tmp_path / "run")
    assert report.weights == "ema" and report.source.endswith("ema.safetensors")
    assert len(report.keys("dropped")) == 4 and report.warnings == []  # fps embedder of the source
    assert C.weights_checksum(video) != C.weights_checksum(video_model(num_classes=3, learn_sigma=False))
    init_from(video, tmp_path / "run", weights="model")
    assert torch.equal(video.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    report = init_from(video_model(num_classes=3, learn_sigma=False, time_mode="fps-embed"), tmp_path / "w.safetensors")
    assert len(report.keys("loaded")) == len(src.state_dict())


# ------------------------------------------------------------------------------ recipes / train


def test_train_starts_from_an_official_checkpoint_and_reports_the_mapping(tmp_path):
    from typer.testing import CliRunner

    from eqmctl.cli import app
    from tests.test_train import FAST, TINY

    # a pixel-space image model in the official layout that fits the fast tiny recipe (3 x 16 x 16, patch 4)
    img = image_model(input_size=16, in_channels=3, patch_size=4, num_classes=4)
    path = write_official(tmp_path / "img.pt", img, official_args(model="EqM-tiny/4", image_size=None, num_classes=4))
    args = ["train", str(TINY), *FAST, "model.depth=4", "train.steps=1", f"model.init_from={path}", "model.temporal_patch=2"]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--validate"])
    assert res.exit_code == 0, res.output
    assert "initial weights from" in res.output and "adapted" in res.output and "x_embedder.proj.weight" in res.output

    res = runner.invoke(app, [*args, "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "initial weights from" in res.output and "loaded" in res.output and "2D kernel / 2" in res.output
    trained, _ = C.load_model(tmp_path / "run", use_ema=False)
    moved = (trained.blocks[0].attn.qkv.weight - img.blocks[0].attn.qkv.weight).abs().max()
    assert moved < 0.01  # one AdamW step (lr 1e-3) away from the image weights

    res = runner.invoke(app, ["train", str(TINY), *FAST, f"model.init_from={tmp_path / 'missing.pt'}", "--validate"])
    assert res.exit_code == 2 and "model.init_from:" in res.output and "not found" in res.output


# ------------------------------------------------------------------------------ sampling images


def official_reference(model, z, y, *, cfg_scale, eta, steps, mu=None):
    """The official sample_gd.py loop written out: a doubled batch, guidance on channels :3 of
    forward_with_cfg's output, both halves rebuilt from the first, the first half kept."""
    n = z.shape[0]
    xt = torch.cat([z, z])
    ys = torch.cat([y, torch.full_like(y, model.config.num_classes)])
    m = torch.zeros_like(xt)
    with torch.no_grad():
        for _ in range(steps):
            x_in = xt + eta * m * mu if mu is not None else xt
            half = x_in[:n]
            out = model(torch.cat([half, half]), None, ys)
            eps, rest = out[:, :3], out[:, 3:]
            cond, uncond = eps.chunk(2)
            guided = uncond + cfg_scale * (cond - uncond)
            out = torch.cat([torch.cat([guided, guided]), rest], dim=1)
            if mu is not None:
                m = out
            xt = xt + out * eta
    return xt[:n]


@pytest.mark.parametrize("mu", [None, 0.3])
def test_cfg_channels_3_reproduces_the_official_guidance_exactly(official, mu):
    from eqm.sampler import sample

    _, path = official
    model, _ = load_official_model(path)
    z, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 5, 9])
    ref = official_reference(model, z, y, cfg_scale=4.0, eta=0.05, steps=4, mu=mu)
    kw = SamplerSettings(method="nag" if mu else "gd", steps=4, step_size=0.05, momentum=mu or 0.0, cfg_scale=4.0, tol=0)
    ours = sample(model, z, None, y, replace(kw, guidance_channels=3)).x
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    default = sample(model, z, None, y, kw).x  # ours guides all 4 channels: channel 3 differs
    assert torch.allclose(default[:, :3], ours[:, :3], atol=1e-1) and not torch.allclose(default[:, 3], ours[:, 3], atol=1e-5)
    with pytest.raises(EqmError, match="guidance_channels must be between 1 and the model's 4"):
        sample(model, z, None, y, replace(kw, guidance_channels=5))


def test_sample_official_pt_writes_decoded_pngs_and_a_grid(official, tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from eqm.images import sample_official
    from eqm.sampler import sample
    from eqm.vae import load_vae
    from eqmctl.cli import app
    from tests.tiny_vae import save_tiny_kl

    _, path = official
    vae_dir = save_tiny_kl(tmp_path / "sd-vae", scaling_factor=0.18215)
    out = tmp_path / "imgs"
    res = CliRunner().invoke(app, ["sample", "--ckpt", str(path), "--vae", str(vae_dir), "-N", "3", "--labels", "2,7",
                                   "--sampler", "nag", "--steps", "3", "--step-size", "0.01", "--cfg-scale", "1.5",
                                   "--cfg-channels", "3", "--fps", "24", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "3 images" in res.output and "cfg 1.5 on 3 channels" in res.output and "--fps ignored" in res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["image_00000.png", "image_00001.png", "image_00002.png", "image_grid.png", "images.json"]
    assert Image.open(out / "image_00001.png").size == (64, 64)  # 8x8 latents through the 8x VAE
    doc = json.loads((out / "images.json").read_text())
    assert [i["label"] for i in doc["images"]] == [2, 7, 2] and doc["settings"]["guidance_channels"] == 3
    assert doc["weights"] == "ema" and doc["args"]["model"] == "EqM-tiny/2" and doc["vae"]["class_name"] == "AutoencoderKL"

    # the library call behind it: the sampler's latents, decoded by the VAE
    summary, gen, loaded = sample_official(path, tmp_path / "lib", vae_path=vae_dir, num_samples=2,
                                           settings=SamplerSettings(steps=2, step_size=0.01))
    model, _ = load_official_model(path)
    from eqm.generate import sample_noise

    direct = sample(model, sample_noise(2, (4, 8, 8), 0), None, torch.tensor([0, 1]),
                    SamplerSettings(steps=2, step_size=0.01, tol=0)).x  # the paper's: no adaptive stop
    assert torch.allclose(gen.latents, direct, atol=1e-6)
    assert torch.allclose(gen.images, load_vae(vae_dir).decode(direct.unsqueeze(2)).squeeze(2), atol=1e-5)
    assert gen.settings.method == "gd" and gen.settings.tol == 0 and loaded.weights == "ema"


def test_sample_official_errors_are_one_line(official, tmp_path):
    from typer.testing import CliRunner

    from eqmctl.cli import app

    _, path = official
    runner = CliRunner()
    res = runner.invoke(app, ["sample", "--ckpt", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--vae is needed: this model makes 4-channel latents" in res.output
    assert not (tmp_path / "o").exists()
    res = runner.invoke(app, ["sample", "--ckpt", str(path), "--vae", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "VAE folder not found" in res.output
    (tmp_path / "file").write_text("x")  # an --out that is a file fails before the checkpoint is read
    res = runner.invoke(app, ["sample", "--ckpt", str(path), "--out", str(tmp_path / "file")])
    assert res.exit_code == 2 and "not a folder" in res.output and (tmp_path / "file").read_text() == "x"
    marker = tmp_path / "pwned"
    torch.save({"ema": {}, "args": _Marker(str(marker))}, tmp_path / "evil.pt")
    res = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "refused to load" in res.output and not marker.exists()
    C.save_checkpoint(tmp_path / "run", 1, model=video_model(), config=video_model().config, recipe={})
    res = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--fps is required" in res.output


def test_image_sampling_refuses_a_batch_that_cannot_fit_before_drawing_noise():
    from eqm.images import generate_images

    img = image_model(in_channels=3)  # RGB: no VAE needed
    with pytest.raises(EqmError, match="needs about"):  # 10^9 images of 16 tokens: refused, nothing drawn
        generate_images(img, num_samples=1_000_000_000, settings=SamplerSettings(steps=1))


def test_latent_training_starts_from_the_official_checkpoint_through_the_vae(official, tmp_path):
    """The fine-tune recipes' path at a tiny size: SD-VAE-style latents (encoded on the fly), the
    official 4-channel image weights mapped in, one step trained, the video checkpoint sampled."""
    from typer.testing import CliRunner

    from eqmctl.cli import app
    from tests.test_train import FAST, TINY
    from tests.tiny_vae import save_tiny_kl

    img, path = official
    vae_dir = save_tiny_kl(tmp_path / "sd-vae", scaling_factor=0.18215)
    run = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", str(TINY), *FAST, "data.height=64", "data.width=64", "model.patch_size=2", "model.depth=4",
        "model.learn_sigma=false", f"vae.path={vae_dir}", f"model.init_from={path}", "train.steps=1",
        "data.synthetic.num_classes=10", "--run-dir", str(run),
    ])
    assert res.exit_code == 0, res.output
    assert "initial weights from" in res.output and "sigma half dropped" in res.output
    model, _ = C.load_model(run, use_ema=False)
    assert model.config.in_channels == 4 and model.config.input_size == (8, 8)
    assert (model.blocks[1].mlp.fc2.weight - img.blocks[1].mlp.fc2.weight).abs().max() < 0.01
