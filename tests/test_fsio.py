"""eqm.fsio: atomic, durable writes with ordinary permissions, and checkpoint publication."""

import json
import os
import stat

import pytest
import torch

from eqm import checkpoint as C
from eqm import fsio
from eqm.config import EqMConfig
from eqm.model import EqMTransformer


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def trace_fs(monkeypatch):
    """Record fsync (of which path) and rename/replace calls, in order."""
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("rename", str(a), str(b)))
        return real_replace(a, b)

    def rename(a, b):
        events.append(("rename", str(a), str(b)))
        return real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask):
    umask(0o022)
    assert mode(fsio.write_text(tmp_path / "a.txt", "a")) == 0o644
    umask(0o027)
    assert mode(fsio.write_json(tmp_path / "b.json", {"x": 1})) == 0o640
    with fsio.atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"c")
    assert mode(tmp_path / "c.bin") == 0o640
    # a plain open(path, "w") keeps the mode of the file it overwrites
    (tmp_path / "d.txt").write_text("old")
    os.chmod(tmp_path / "d.txt", 0o600)
    fsio.write_text(tmp_path / "d.txt", "new")
    assert mode(tmp_path / "d.txt") == 0o600 and (tmp_path / "d.txt").read_text() == "new"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.bin", "d.txt"]


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = trace_fs(monkeypatch)
    fsio.write_text(tmp_path / "a.txt", "a")
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]
    assert ".tmp-" in events[0][1] and events[1][2] == str(tmp_path / "a.txt") and events[2][1] == str(tmp_path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    target.write_text("previous\n")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fsio.write_json(target, {"new": True})
    with pytest.raises(KeyboardInterrupt):
        with fsio.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_checkpoint_weights_are_fsynced_before_publication(tmp_path, monkeypatch, umask):
    umask(0o022)
    model = EqMTransformer(EqMConfig(input_size=8, num_frames=2, patch_size=4, hidden_size=16, depth=1, num_heads=2))
    run = tmp_path / "run"
    events = trace_fs(monkeypatch)
    ck = C.save_checkpoint(run, 1, model=model, ema=model, config=model.config, recipe={},
                           optimizer_state={"step": torch.tensor(1)})
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(ck))
    synced_before = {os.path.basename(e[1]) for e in events[:publish] if e[0] == "fsync"}
    assert {C.MODEL_FILE, C.EMA_FILE, C.OPTIM_FILE, C.STATE_FILE} <= synced_before
    assert any(e[0] == "fsync" and e[1].endswith(".tmp-step_0000001-" + str(os.getpid())) for e in events[:publish])
    assert ("fsync", str(run / "checkpoints")) in events[publish + 1:]
    assert {mode(p) for p in ck.iterdir()} == {0o644}
    # republishing the same step replaces it whole
    events.clear()
    C.save_checkpoint(run, 1, model=model, config=model.config, recipe={"again": 1})
    assert C.load_state(ck)["recipe"] == {"again": 1} and not (ck / C.EMA_FILE).exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001"]
