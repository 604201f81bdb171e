"""Recipe schema: YAML loading, overrides, one-line errors naming the dotted key (CLI exit code 2)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from eqm.errors import EqmError
from eqm.recipe import Recipe, load_recipe, parse_override, recipe_from_dict, schema_lines
from eqmctl.cli import app

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def err(tmp_path, data, overrides=()):
    with pytest.raises(EqmError) as e:
        load_recipe(write(tmp_path, data), list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    assert e.value.exit_code == 2
    return msg


# --- the shipped recipes ---------------------------------------------------------------------


def test_shipped_recipes_exist_and_load():
    names = {p.name for p in RECIPES}
    assert {"tiny-synthetic.yaml", "ucf101-S2.yaml", "ucf101-B2.yaml"} <= names
    for p in RECIPES:
        r = load_recipe(p)
        assert r.name  # defaults to the stem when the file has no name
        # every shipped recipe is a complete round trip through its resolved form
        assert recipe_from_dict(r.to_dict()) == r


def test_shipped_recipe_choices():
    tiny = load_recipe(REPO / "recipes" / "tiny-synthetic.yaml")
    assert tiny.data.source == "synthetic" and tiny.model.time.mode == "seconds"
    assert tiny.data.fps_min <= 8 and tiny.data.fps_max >= 30
    assert tiny.data.height <= 32 and tiny.data.width <= 32 and tiny.data.num_frames == 11
    # the calibration's 8-frame clips at 6 fps (7/6 s) lie inside the longest training clip
    assert (tiny.data.num_frames - 1) / tiny.data.fps_min >= 7 / 6
    for name, size in (("ucf101-S2.yaml", "S"), ("ucf101-B2.yaml", "B")):
        r = load_recipe(REPO / "recipes" / name)
        assert r.model.size == size and r.model.patch_size == 2
        assert r.train.mixed_precision == "bf16"
        assert r.data.source in ("folder", "manifest")


def test_defaults_and_name_from_stem(tmp_path):
    r = load_recipe(write(tmp_path, "{}\n", name="my-run.yaml"))  # an empty mapping: every default (an empty file is an error)
    assert r == recipe_from_dict({}, name="my-run")
    assert r.name == "my-run" and r.objective.a == 0.8 and r.objective.lam == 4.0
    assert r.objective.energy is None and r.model.learn_sigma is False


def test_recipe_builds_the_model_config_from_its_keys():
    """Every EqMConfig field is either set from the recipe key ARCH_KEYS names or by the caller, so a
    new model option is a dataclass field plus a recipe field; a changed key reaches the config."""
    from eqm.config import EqMConfig
    from eqm.recipe import ARCH_KEYS

    assert list(ARCH_KEYS) == EqMConfig.field_names()
    base = recipe_from_dict({})
    for field, key in ARCH_KEYS.items():
        if key is None:
            continue
        base.get(key)  # the key exists in the schema
    r = recipe_from_dict({"model": {"size": "mini", "pos": "rope", "depth": 2, "time": {"mode": "index", "frac": 0.5}},
                          "objective": {"energy": "dot"}, "data": {"height": 16, "width": 24, "num_frames": 6}})
    cfg = r.model_config(num_classes=5)
    assert cfg == EqMConfig.from_size("mini", input_size=(16, 24), num_frames=6, pos="rope", depth=2, time_mode="index",
                                      time_frac=0.5, energy="dot", num_classes=5)
    assert r.model_config(num_classes=5, time_order="paired").time_order == "paired"
    latent = r.model_config(num_classes=5, shape=(4, 3, 8, 8))  # latent space: the latents' shape
    assert (latent.in_channels, latent.num_frames, latent.input_size) == (4, 3, (8, 8))


def test_recipe_sample_section_is_the_sampler_settings():
    """sample.* keys are SamplerSettings fields by name (a new sampler option is a field in both);
    null takes the method's measured default, except tol, where null runs every step."""
    import dataclasses

    from eqm.config import SamplerSettings
    from eqm.recipe import SampleConfig

    assert [f.name for f in dataclasses.fields(SampleConfig)] == SamplerSettings.field_names()
    r = recipe_from_dict({"sample": {"method": "nag", "steps": 7, "cfg_scale": 2.0, "guidance_channels": 3}})
    assert r.sampler_settings() == SamplerSettings("nag", steps=7, tol=0.0, cfg_scale=2.0, guidance_channels=3)
    with pytest.raises(EqmError, match=r"sample.steps must be an integer >= 1"):
        recipe_from_dict({"sample": {"steps": 0}})


def test_every_field_is_documented():
    rows = schema_lines()
    assert len(rows) > 50
    for key, tp, default, doc in rows:
        assert doc.strip(), f"{key} has no doc"
    keys = {r[0] for r in rows}
    for k in ("model.time.mode", "model.time.ref_fps", "objective.energy", "data.fps_max",
              "train.grad_accum", "train.preview_fps", "sample.cfg_scale", "tracking.backend"):
        assert k in keys


# --- errors ----------------------------------------------------------------------------------


def test_unknown_key_names_dotted_key_and_suggests(tmp_path):
    msg = err(tmp_path, {"train": {"lrr": 0.1}})
    assert "train.lrr" in msg and "did you mean 'train.lr'" in msg
    msg = err(tmp_path, {"model": {"time": {"mdoe": "index"}}})
    assert "model.time.mdoe" in msg and "model.time.mode" in msg
    msg = err(tmp_path, {"trian": {}})
    assert "'trian'" in msg and "did you mean 'train'" in msg


def test_wrong_types(tmp_path):
    msg = err(tmp_path, {"train": {"steps": "many"}})
    assert "train.steps" in msg and "an integer" in msg and "'many'" in msg
    assert "train.steps" in err(tmp_path, {"train": {"steps": 10.5}})
    assert "data.random_flip" in err(tmp_path, {"data": {"random_flip": "yes please"}})
    assert "train.lr" in err(tmp_path, {"train": {"lr": True}})  # a bool is not a number
    msg = err(tmp_path, {"model": {"time": {"mode": "frames"}}})
    assert "model.time.mode" in msg and "'seconds'" in msg
    msg = err(tmp_path, {"model": {"time": {"order": "sideways"}}})
    assert "model.time.order" in msg and "'paired'" in msg and "'aligned'" in msg
    assert "'model'" in err(tmp_path, {"model": 3})
    assert "mapping" in err(tmp_path, "- just\n- a list\n")


def test_impossible_values(tmp_path):
    cases = [
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay"),
        ({"train": {"time_shift": -0.5}}, "train.time_shift"),
        ({"objective": {"a": 1.0}}, "objective.a"),
        ({"data": {"fps_min": 40, "fps_max": 30}}, "data.fps_min"),
        ({"data": {"height": 30}, "model": {"patch_size": 4}}, "data.height"),
        ({"data": {"num_frames": 7}, "model": {"temporal_patch": 2}}, "data.num_frames"),
        ({"data": {"source": "folder"}}, "data.root"),
        ({"data": {"source": "manifest"}}, "data.manifest"),
        ({"train": {"preview_fps": 0}}, "train.preview_fps"),
        ({"train": {"lr": float("nan")}}, "train.lr"),
        ({"model": {"size": "huge"}}, "model.size"),
        ({"model": {"hidden_size": 100, "num_heads": 3}}, "model.hidden_size"),
    ]
    for data, key in cases:
        assert key in err(tmp_path, data), data
    assert "did you mean 'S'" in err(tmp_path, {"model": {"size": "s"}})


def test_invalid_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in err(tmp_path, "train: {steps: [1,\n")
    with pytest.raises(EqmError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


# --- overrides -------------------------------------------------------------------------------


def test_override_parsing():
    assert parse_override("train.lr=3e-4") == ("train.lr", "3e-4")  # YAML 1.1: a string, coerced later
    assert parse_override("model.energy=null") == ("model.energy", None)
    assert parse_override("data.random_flip=true") == ("data.random_flip", True)
    assert parse_override("data.root=/data/ucf 101") == ("data.root", "/data/ucf 101")
    assert parse_override("name=") == ("name", "")
    for bad in ("train.lr", "=3", "train..lr=1", "train.lr=[1,"):
        with pytest.raises(EqmError):
            parse_override(bad)


def test_overrides_apply_and_are_typed(tmp_path):
    p = write(tmp_path, {"train": {"lr": 0.001, "steps": 10}})
    r = load_recipe(p, ["train.lr=3e-4", "train.steps=20", "model.time.mode=index", "objective.energy=dot",
                        "data.synthetic.num_classes=2", "tracking.backend=none", "train.preview_fps=29.97"])
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)
    assert r.train.steps == 20 and r.model.time.mode == "index" and r.objective.energy == "dot"
    assert r.data.synthetic.num_classes == 2 and r.tracking.backend is None
    r2 = load_recipe(p, ["objective.energy=null"])
    assert r2.objective.energy is None
    with pytest.raises(EqmError, match=r"override 'train.stesp=5'.*did you mean 'train.steps'"):
        load_recipe(p, ["train.stesp=5"])
    with pytest.raises(EqmError, match="train.steps must be an integer"):
        load_recipe(p, ["train.steps=abc"])
    with pytest.raises(EqmError, match="'train' is a section"):
        load_recipe(p, ["train=5"])
    with pytest.raises(EqmError, match="model.patch_size.time"):
        load_recipe(p, ["model.patch_size.time=1"])


def test_to_dict_roundtrip_and_yaml(tmp_path):
    r = load_recipe(write(tmp_path, {"model": {"time": {"ref_fps": 30}}}), ["train.lr=1e-3"])
    d = r.to_dict()
    assert d["model"]["time"]["ref_fps"] == 30.0 and d["train"]["lr"] == 1e-3
    again = load_recipe(write(tmp_path, r.to_yaml(), name="again.yaml"))
    assert again == r
    assert isinstance(r, Recipe) and r.get("model.time.ref_fps") == 30.0


# --- through the CLI -------------------------------------------------------------------------


runner = CliRunner()


@pytest.mark.parametrize(
    "data,overrides,needle",
    [
        ({"train": {"stpes": 3}}, [], "train.stpes"),
        ({"train": {"steps": "x"}}, [], "train.steps"),
        ({"data": {"fps_min": 0}}, [], "data.fps_min"),
        ({}, ["train.lrr=1"], "did you mean 'train.lr'"),
        ({}, ["model.size=Q"], "model.size"),
    ],
)
def test_cli_recipe_errors_exit_2(tmp_path, data, overrides, needle):
    p = write(tmp_path, data)
    res = runner.invoke(app, ["train", str(p), *overrides, "--runs-root", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nothing written for a bad recipe


def test_cli_subprocess_error_is_one_line_no_traceback(tmp_path):
    p = write(tmp_path, {"objective": {"lam": -4}})
    proc = subprocess.run([sys.executable, "-m", "eqmctl.cli", "train", str(p)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "objective.lam" in lines[0] and str(p) in lines[0]


def test_cli_schema_and_missing_recipe():
    res = runner.invoke(app, ["train", "--schema"])
    assert res.exit_code == 0 and "model.time.mode" in res.output
    res = runner.invoke(app, ["train"])
    assert res.exit_code == 2 and "missing RECIPE.yaml" in res.output


def test_yaml_boolean_words_give_back_the_choice_written(tmp_path):
    """PyYAML reads `no` as False: `train.mixed_precision: no` (Accelerate's own spelling) and the
    override `train.mixed_precision=no` mean the choice 'no', not a type error."""
    r = load_recipe(write(tmp_path, "train:\n  mixed_precision: no\n"))
    assert r.train.mixed_precision == "no"
    r = load_recipe(write(tmp_path, "{}\n"), ["train.mixed_precision=no"])
    assert r.train.mixed_precision == "no"
    with pytest.raises(EqmError, match="train.mixed_precision must be one of"):
        load_recipe(write(tmp_path, "{}\n"), ["train.mixed_precision=yes"])  # no choice is spelled yes
