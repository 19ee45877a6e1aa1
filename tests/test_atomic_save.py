"""Saving replaces a checkpoint folder atomically, and refuses bad arguments before writing anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_adanorm
from hf_adanorm.checkpoint import from_pretrained, save_pretrained
from hf_adanorm.remote_code import MODELING_FILE
from test_fold import logits, tiny_lm

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def patched(norm="adanorm", seed=0, **options):
    torch.manual_seed(seed)
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, norm, **options)
    return model


@pytest.mark.slow
def test_sigkill_at_many_points_leaves_the_old_or_the_new_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "kill_save_driver.py"), str(tmp_path), "30"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    trials = result["trials"]
    assert len(trials) >= 30 + 20 and all(t["killed"] for t in trials), "some save was not killed"
    broken = [t for t in trials if t["found"] not in ("old", "new")]
    assert not broken, broken[:5]
    found = {t["found"] for t in trials}
    assert found == {"old", "new"}, f"the kills never fell on both sides of the swap: {found}"
    assert result["leftovers_after_clean_save"] == [] and result["clean_save"] == "new"


BAD_CALLS = {  # id: (save_pretrained keyword arguments, error type, message)
    "metrics_not_a_dict": (dict(metrics="acc=1"), TypeError, "metrics must be a dict"),
    "base_model_not_a_str": (dict(base_model=3), TypeError, "base_model must be a hub id"),
    "pickle_weights": (dict(safe_serialization=False), ValueError, "safetensors only"),
    "push_to_hub": (dict(push_to_hub=True), ValueError, "push_to_hub"),
    "plain_for_adanorm": (dict(plain=True), ValueError, "plain=True needs"),
    "unknown_transformers_kwarg": (dict(max_shard_size="not a size"), ValueError, "size"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_arguments_leave_the_old_checkpoint_exactly_as_it_was(tmp_path, case):
    target = tmp_path / "ckpt"
    save_pretrained(patched(), target, metrics={"step": 1})
    (target / "tokenizer.json").write_text("{}")
    before = snapshot(target)
    kwargs, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        save_pretrained(patched(seed=1), target, **kwargs)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left


def test_a_file_or_mount_point_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_pretrained(patched(), tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "mine"
    mount = next((m for m in ("/dev/shm", "/proc", "/sys") if os.path.ismount(m)), None)
    if mount is not None:
        with pytest.raises(OSError, match="mount point"):
            save_pretrained(patched(), mount)


def test_an_error_while_writing_leaves_the_old_checkpoint_and_no_temporary_folder(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_pretrained(patched(), target)
    before = snapshot(target)
    from huggingface_hub import ModelCard

    def full_disk(self, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ModelCard, "save", full_disk)  # the last file written
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(patched(seed=1), target)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_other_files_and_folders_are_kept_and_stale_ones_of_an_earlier_save_go(tmp_path):
    target = tmp_path / "out"
    save_pretrained(patched(), target)  # remote code: modeling_hf_adanorm.py
    (target / "tokenizer.json").write_text('{"mine": 1}')
    (target / "checkpoint-500").mkdir()
    (target / "checkpoint-500" / "optimizer.pt").write_bytes(b"\x00" * 100)
    (target / "model-00002-of-00002.safetensors").write_bytes(b"stale shard of an older save")
    model = patched("layernorm_simple", seed=1)
    save_pretrained(model, target, remote_code=False)
    assert (target / "tokenizer.json").read_text() == '{"mine": 1}'
    assert (target / "checkpoint-500" / "optimizer.pt").read_bytes() == b"\x00" * 100
    assert not (target / MODELING_FILE).exists() and not (target / "model-00002-of-00002.safetensors").exists()
    loaded = from_pretrained(type(model), target).eval()
    assert torch.equal(logits(loaded), logits(model))


def test_saving_where_the_model_was_loaded_from(tmp_path):
    save_pretrained(patched(), tmp_path / "ckpt")
    loaded = from_pretrained(type(patched()), tmp_path / "ckpt").eval()
    expected = logits(loaded)
    save_pretrained(loaded, tmp_path / "ckpt", metrics={"again": 1})  # its weights file is replaced, not edited
    again = from_pretrained(type(loaded), tmp_path / "ckpt").eval()
    assert torch.equal(logits(again), expected)


def test_a_symlinked_folder_is_replaced_behind_its_link_and_the_working_folder_is_refused(tmp_path, monkeypatch):
    real, link = tmp_path / "real", tmp_path / "link"
    save_pretrained(patched(), real)
    link.symlink_to(real, target_is_directory=True)
    model = patched("layernorm_simple", seed=1)
    save_pretrained(model, link, remote_code=False)
    assert link.is_symlink() and not (real / MODELING_FILE).exists()
    assert torch.equal(logits(from_pretrained(type(model), link).eval()), logits(model))
    monkeypatch.chdir(real)
    before = snapshot(real)
    with pytest.raises(OSError, match="current working folder"):
        save_pretrained(patched(), ".")
    assert snapshot(real) == before

