"""Checkpoint I/O: safetensors + JSON + weights_only torch file, atomic writes, pruning, resolving."""

import json
import os
import random
import time

import numpy as np
import pytest
import torch

from eqm import checkpoint as C
from eqm.errors import EqmError
from eqm.config import EqMConfig
from eqm.model import EqMTransformer

ARCH = dict(input_size=8, num_frames=2, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=3)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return EqMTransformer(EqMConfig(**{**ARCH, **kw}))


def save(run, step, model=None, ema=None, keep_last=0, opt_state=None):
    model = model or tiny()
    return C.save_checkpoint(run, step, model=model, ema=ema, config=model.config,
                             recipe={"name": "t", "train": {"lr": 1.0}}, optimizer_state=opt_state, keep_last=keep_last)


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return model


def test_save_load_roundtrip(tmp_path):
    run = tmp_path / "run"
    model, ema = perturb(tiny(), 1), perturb(tiny(), 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 2, 8, 8), torch.tensor([[0.0, 0.1]] * 2)).pow(2).mean().backward()
    opt.step()
    ck = save(run, 7, model, ema, opt_state={"optimizer": opt.state_dict(), "rng": C.rng_state(), "step": 7})
    assert ck == run / "checkpoints" / "step_0000007"
    assert sorted(os.listdir(ck)) == ["ema.safetensors", "model.safetensors", "optim.pt", "state.json"]
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 7 and state["arch"] == model.config.to_dict() and state["recipe"]["name"] == "t"

    loaded, st = C.load_model(ck, use_ema=True)
    assert st["step"] == 7 and st["weights"].endswith("ema.safetensors")
    assert C.weights_checksum(loaded) == C.weights_checksum(ema) != C.weights_checksum(model)
    raw, _ = C.load_model(run, use_ema=False)  # a run dir resolves to its latest checkpoint
    assert C.weights_checksum(raw) == C.weights_checksum(model)
    assert not raw.training

    # optimizer state and RNG states come back through weights_only=True
    ts = C.load_training_state(ck)
    opt2 = torch.optim.AdamW(raw.parameters(), lr=1e-3)
    opt2.load_state_dict(ts["optimizer"])
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    with pytest.raises(Exception):  # a plain pickle of arbitrary objects would be refused
        torch.save({"x": object()}, tmp_path / "bad.pt")
        torch.load(tmp_path / "bad.pt", weights_only=True)


def test_rng_state_roundtrip_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = C.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expect = (random.random(), np.random.rand(), torch.rand(3))
    C.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expect[0] == got[0] and expect[1] == got[1] and torch.equal(expect[2], got[2])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    run = tmp_path / "run"
    save(run, 1)

    class Boom:  # torch.save cannot pickle a local class -> fails half-way through the checkpoint
        pass

    with pytest.raises(Exception):
        save(run, 2, opt_state={"bad": Boom()})
    names = sorted(os.listdir(run / "checkpoints"))
    assert names == ["step_0000001"]  # no step_0000002, no .tmp leftovers
    assert C.latest_checkpoint(run).name == "step_0000001"


def test_overwrite_same_step_and_stale_cleanup(tmp_path):
    run = tmp_path / "run"
    save(run, 3, perturb(tiny(), 1))
    m2 = perturb(tiny(), 2)
    save(run, 3, m2)
    model, _ = C.load_model(run, use_ema=False)
    assert C.weights_checksum(model) == C.weights_checksum(m2)
    (run / "checkpoints" / ".tmp-step_0000009-123").mkdir()
    (run / "checkpoints" / "step_0000010").mkdir()  # no state.json: incomplete, never used
    assert [p.name for p in C.list_checkpoints(run)] == ["step_0000003"]
    assert C.clean_stale(run) == 1


def test_keep_last_prunes_oldest(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4, 5):
        save(run, step, keep_last=2)
    assert [p.name for p in C.list_checkpoints(run)] == ["step_0000004", "step_0000005"]
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000004", "step_0000005"]


def test_resolve_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    a = save(runs / "a-1", 10)
    time.sleep(0.02)
    b5 = save(runs / "b-1", 5)
    time.sleep(0.02)
    b6 = save(runs / "b-1", 6)
    os.utime(b5 / "state.json")  # mtime of a checkpoint's state decides the latest run only via its newest checkpoint
    assert C.resolve_checkpoint(None, runs) == b6
    assert C.resolve_checkpoint("latest", runs, run_prefix="a") == a
    assert C.resolve_checkpoint(runs / "a-1") == a
    assert C.resolve_checkpoint(b5) == b5
    assert C.resolve_checkpoint(b5 / "model.safetensors") == b5
    assert C.run_dir_of(b6) == runs / "b-1"
    with pytest.raises(EqmError, match="checkpoint not found: .*nope"):
        C.resolve_checkpoint(runs / "nope")
    with pytest.raises(EqmError, match="no checkpoint found"):
        C.resolve_checkpoint(None, tmp_path / "empty")
    (runs / "c-1" / "checkpoints").mkdir(parents=True)
    with pytest.raises(EqmError, match="no complete checkpoint"):
        C.resolve_checkpoint(runs / "c-1")
    (tmp_path / "plain").mkdir()
    with pytest.raises(EqmError, match="neither a checkpoint"):
        C.resolve_checkpoint(tmp_path / "plain")


def test_arch_mismatch_and_corruption_are_clear_errors(tmp_path):
    ck = save(tmp_path / "run", 1)
    state = json.loads((ck / "state.json").read_text())
    state["arch"]["hidden_size"] = 32
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(EqmError, match=r"do not match the model architecture.*of another shape"):
        C.load_model(ck)
    state["arch"] = dict(ARCH, hidden_size=16, depth=2)
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(EqmError, match="missing"):
        C.load_model(ck)
    state["arch"]["flux_capacitor"] = True
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(EqmError, match="not understood"):
        C.load_model(ck)

    ck2 = save(tmp_path / "run2", 1)
    (ck2 / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(EqmError, match="cannot read weights .*model.safetensors"):
        C.load_model(ck2, use_ema=False)
    (ck2 / "model.safetensors").unlink()
    with pytest.raises(EqmError, match="weights not found: .*model.safetensors"):
        C.load_model(ck2, use_ema=False)
    with pytest.raises(EqmError, match="no training state"):
        C.load_training_state(ck2)
