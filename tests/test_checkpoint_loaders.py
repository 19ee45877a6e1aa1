"""The loader matrix of docs/checkpoints.md: every way of loading a saved checkpoint, each in a
fresh process, with and without hf_adanorm importable. A patched checkpoint loads as the saved
function or is refused with a message saying how to load it; it never loads as the stock model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_adanorm
from hf_adanorm.checkpoint import save_pretrained
from test_fold import tiny_lm

REPO = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(5))
HOW_TO_LOAD = r"trust_remote_code=True"

# (checkpoint, with hf_adanorm importable, loader expression, what comes out, expected)
# expected: "logits" / "hidden" (the saved model's logits / last hidden state), or "refused:<regex>"
LOGITS, HIDDEN = "model(input_ids=ids).logits", "model(input_ids=ids).last_hidden_state"
BASE_HIDDEN = "model.transformer(input_ids=ids).last_hidden_state"
CELLS = {
    # the library, any class (no remote code runs)
    "lib-auto-causal": ("adanorm", True, "hf_adanorm.from_pretrained(AutoModelForCausalLM, path)", LOGITS, "logits"),
    "lib-concrete": ("adanorm", True, "hf_adanorm.from_pretrained(GPT2LMHeadModel, path)", LOGITS, "logits"),
    "lib-auto-base": ("adanorm", True, "hf_adanorm.from_pretrained(AutoModel, path)", HIDDEN, "hidden"),
    "lib-new-head": ("adanorm", True, "hf_adanorm.from_pretrained(AutoModelForSequenceClassification, path)",
                     BASE_HIDDEN, "hidden"),
}
for plugin in (True, False):
    tag = "with" if plugin else "without"
    CELLS.update({
        f"auto-causal-{tag}": ("adanorm", plugin, "AutoModelForCausalLM.from_pretrained(path)", LOGITS,
                               f"refused:{HOW_TO_LOAD}"),
        f"auto-causal-trust-{tag}": ("adanorm", plugin, "AutoModelForCausalLM.from_pretrained(path, "
                                     "trust_remote_code=True)", LOGITS, "logits"),
        f"auto-base-{tag}": ("adanorm", plugin, "AutoModel.from_pretrained(path)", HIDDEN, f"refused:{HOW_TO_LOAD}"),
        f"auto-base-trust-{tag}": ("adanorm", plugin, "AutoModel.from_pretrained(path, trust_remote_code=True)",
                                   HIDDEN, "hidden"),
        f"auto-new-head-trust-{tag}": ("adanorm", plugin, "AutoModelForSequenceClassification.from_pretrained("
                                       "path, trust_remote_code=True)", BASE_HIDDEN, "hidden"),
        f"concrete-{tag}": ("adanorm", plugin, "GPT2LMHeadModel.from_pretrained(path)", LOGITS,
                            "refused:not a stock transformers checkpoint.*hf_adanorm"),
        f"concrete-trust-{tag}": ("adanorm", plugin, "GPT2LMHeadModel.from_pretrained(path, trust_remote_code=True)",
                                  LOGITS, "refused:not a stock transformers checkpoint.*hf_adanorm"),
        f"pipeline-{tag}": ("adanorm", plugin, "pipeline('text-generation', model=path).model", LOGITS,
                            f"refused:{HOW_TO_LOAD}"),
        f"no-remote-code-auto-trust-{tag}": ("no_remote", plugin, "AutoModelForCausalLM.from_pretrained(path, "
                                             "trust_remote_code=True)", LOGITS, "refused:hf_adanorm_gpt2"),
        f"no-remote-code-concrete-{tag}": ("no_remote", plugin, "GPT2LMHeadModel.from_pretrained(path)", LOGITS,
                                           "refused:not a stock transformers checkpoint.*hf_adanorm"),
        f"custom-norm-trust-{tag}": ("custom", plugin, "AutoModelForCausalLM.from_pretrained(path, "
                                     "trust_remote_code=True)", LOGITS, "refused:register_norm"),
        f"plain-{tag}": ("plain", plugin, "AutoModelForCausalLM.from_pretrained(path)", LOGITS, "logits"),
    })
CELLS.update({
    "lib-no-remote-code": ("no_remote", True, "hf_adanorm.from_pretrained(AutoModelForCausalLM, path)", LOGITS,
                           "logits"),
    "lib-custom-norm-registered": ("custom", True, "register_scaled() or hf_adanorm.from_pretrained("
                                   "AutoModelForCausalLM, path)", LOGITS, "logits"),
    "lib-custom-norm-unregistered": ("custom", True, "hf_adanorm.from_pretrained(AutoModelForCausalLM, path)",
                                     LOGITS, "refused:register_norm"),
})


class ScaledNorm(hf_adanorm.LayerNormSimple):
    """A user's own norm: LayerNorm-simple times 2."""

    def forward(self, x):
        return 2 * super().forward(x)


def register_scaled():
    if "scaled_test_norm" not in hf_adanorm.available_norms():
        hf_adanorm.register_norm("scaled_test_norm", ScaledNorm, ScaledNorm)


def _checkpoints(folder: Path) -> dict:
    """Save each kind of checkpoint once; returns {kind: (expected logits, expected base hidden state)}."""
    register_scaled()
    made = {}
    for kind, norm, options, save in (("adanorm", "adanorm", dict(fold_affine=True), {}),
                                      ("no_remote", "adanorm", {}, dict(remote_code=False)),
                                      ("custom", "scaled_test_norm", {}, {}),
                                      ("plain", "layernorm_simple", {}, dict(plain=True))):
        torch.manual_seed(0)
        model = tiny_lm("gpt2")
        hf_adanorm.patch_model(model, norm, **options)
        save_pretrained(model, folder / kind, **save)
        with torch.no_grad():
            model.eval()
            made[kind] = {"logits": model(input_ids=IDS).logits, "hidden": model.transformer(input_ids=IDS)[0]}
    return made


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    from hf_adanorm.registry import NORM_REGISTRY
    had_scaled = "scaled_test_norm" in NORM_REGISTRY
    expected = _checkpoints(folder)
    save_file({"ids": IDS}, folder / "ids.safetensors")
    yield folder, expected
    if not had_scaled:  # the registry is process-wide: later test modules must not see the test norm
        NORM_REGISTRY.pop("scaled_test_norm", None)


def run_cell(folder: Path, name: str, kind: str, plugin: bool, loader: str, output: str) -> dict:
    """Load checkpoint ``kind`` with ``loader`` in a fresh interpreter; what happened."""
    prelude = "import sys, os\n"
    if not plugin:  # the repository off sys.path and the name blocked: only torch and transformers
        prelude += ("sys.path[:] = [p for p in sys.path if not (p and os.path.isdir(os.path.join(p, 'hf_adanorm')))]\n"
                    "sys.modules['hf_adanorm'] = None\n")
    else:
        prelude += ("import hf_adanorm\nfrom test_checkpoint_loaders import register_scaled\n")
    code = prelude + textwrap.dedent(f"""
        import json, torch
        from safetensors.torch import load_file, save_file
        from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                                  GPT2LMHeadModel, pipeline)
        ids, path = load_file("ids.safetensors")["ids"], {kind!r}
        try:
            model = {loader}
        except Exception as err:
            json.dump({{"refused": f"{{type(err).__name__}}: {{err}}"}}, open({name + '.json'!r}, "w"))
            raise SystemExit(0)
        with torch.no_grad():
            out = {output}
        save_file({{"out": out.contiguous()}}, {name + '.safetensors'!r})
        json.dump({{"loaded": type(model).__module__ + "." + type(model).__name__}}, open({name + '.json'!r}, "w"))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(folder / f"modules-{name}"),
           "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}" if plugin else "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / f"{name}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CELLS))
def test_loader_matrix_cell(saved, name):
    folder, expected = saved
    kind, plugin, loader, output, want = CELLS[name]
    got = run_cell(folder, name, kind, plugin, loader, output)
    if want.startswith("refused:"):
        assert "refused" in got, f"{name}: loaded as {got.get('loaded')}, expected a refusal"
        assert __import__("re").search(want[len("refused:"):], got["refused"], flags=__import__("re").S), got
        return
    assert "loaded" in got, f"{name}: {got.get('refused')}"
    out = load_file(folder / f"{name}.safetensors")["out"]
    torch.testing.assert_close(out, expected[kind][want], rtol=1e-5, atol=1e-5, msg=name)
    if "trust" in name:  # the remote code served it, not a stock class
        assert got["loaded"].startswith("transformers_modules."), got


def test_the_model_cards_say_how_to_load(saved):
    folder, _ = saved
    custom = (folder / "custom" / "README.md").read_text()
    assert "hf_adanorm.register_norm('scaled_test_norm', ...)" in custom
    assert "hf_adanorm.from_pretrained(transformers.GPT2LMHeadModel, path)" in custom
    assert "trust_remote_code=True)  # via auto_map" not in custom  # that path refuses this norm
    card = (folder / "adanorm" / "README.md").read_text()
    assert "transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" in card
    assert "stock transformers classes refuse it" in card
