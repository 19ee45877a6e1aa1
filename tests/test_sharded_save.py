"""hf_adanorm.save_pretrained on every rank of an FSDP2 / ZeRO-3 sharded model (2 gloo CPU ranks)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_adanorm.checkpoint import from_pretrained
from test_fold import logits

REPO = Path(__file__).resolve().parents[1]
NEEDS_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", pytest.param("zero3", marks=NEEDS_DEEPSPEED)])
def test_every_rank_calls_save_and_rank0_writes_the_whole_model(tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "tests" / "sharded_save_driver.py"), mode, str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["local_elements"] < 0.6 * r["total_elements"] for r in ranks), "the model was not sharded"
    assert ranks[0]["returned"] == str(tmp_path / "sharded") and ranks[1]["returned"] is None
    # a bad argument on rank 1 only: both ranks raised (none waits in the gather), nothing written
    assert "metrics must be a dict" in ranks[1]["refused"]
    assert "failed on rank 1" in ranks[0]["refused"] and not (tmp_path / "never").exists()

    sharded, reference = tmp_path / "sharded", tmp_path / "reference"  # reference: saved before sharding
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in ("config.json", "modeling_hf_adanorm.py"):  # the stock class's name, not FSDP<Class>
        assert (sharded / name).read_text() == (reference / name).read_text(), name
    assert json.loads((sharded / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    ours, theirs = (from_pretrained(AutoModelForCausalLM, folder).eval() for folder in (sharded, reference))
    state, expected = ours.state_dict(), theirs.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(logits(ours), logits(theirs))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
