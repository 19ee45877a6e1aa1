"""Architecture coverage: patch_model finds exactly the last-dimension norms of 30+ models.

Every model is a tiny random one built from its config (nothing from the hub).
What counts as a norm is decided by an independent probe written here, not by
``hf_adanorm.detect``: each leaf module is run, on a copy with random
parameters, on a random input of the shape it saw in the model's own forward,
and its output is fitted per last-dimension channel ``c`` as

    out[..., c] = s_c * y[..., c] + b_c      y = (x - mean(x)) / std(x)   (LayerNorm)
                                             y = x / rms(x)               (RMSNorm)

over all rows, with the input rows scaled and shifted at random.  Channels-first
norms, BatchNorm/GroupNorm, per-head norms with a 2-D weight and everything that
is not a norm fail this fit; weight-norm wrappers are not leaves.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from arch_zoo import ARCHS, BATCH, build, make_inputs, run  # noqa: E402
from transformers import AutoConfig, AutoModel  # noqa: E402

from hf_adanorm import patch_model, unpatch_model  # noqa: E402
from hf_adanorm.norms import _ParameterFreeNorm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the independent probe ---------------------------------------------------------------

def leaf_input_shapes(model, inputs) -> dict[str, torch.Size]:
    """Input shape of every leaf module that the forward pass calls with one float tensor.

    A leaf called with more inputs (the ``gate`` of a gated RMSNorm, the two halves
    of a weight-norm parametrization) is no standalone norm and is left out.
    """
    shapes, handles = {}, []
    for name, module in model.named_modules():
        if name and next(module.children(), None) is None:
            def remember(mod, args, kwargs, name=name):
                inputs = [a for a in (*args, *kwargs.values()) if a is not None]
                if name not in shapes:
                    one_float = len(inputs) == 1 and torch.is_tensor(inputs[0]) and inputs[0].is_floating_point()
                    shapes[name] = inputs[0].shape if one_float else None
            handles.append(module.register_forward_pre_hook(remember, with_kwargs=True))
    try:
        run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: shape for name, shape in shapes.items() if shape is not None}


def _affine_fit(out: torch.Tensor, y: torch.Tensor):
    """Least-squares ``s, b`` of ``out[..., c] = s_c * y[..., c] + b_c`` over all rows."""
    out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1, y.shape[-1])
    s = ((y - y.mean(0)) * (out - out.mean(0))).sum(0) / (y - y.mean(0)).pow(2).sum(0)
    return s, out.mean(0) - s * y.mean(0)


def _close(out, ref) -> bool:
    return bool((out - ref).abs().max() <= 1e-3 * (1 + ref.abs().max()))


def _normalized(x: torch.Tensor, kind: str, eps: float = 0.0) -> torch.Tensor:
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _random_copy(module: nn.Module) -> nn.Module:
    """A float32 copy in eval mode whose parameters are random around 1.

    A random per-channel gain is what makes a 2-D (per-head) weight fail the fit.
    """
    gen = torch.Generator().manual_seed(3)
    clone = copy.deepcopy(module).float().eval()
    with torch.no_grad():
        for p in clone.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1)
    return clone


def probe(module: nn.Module, shape: torch.Size, eps: float | None = None):
    """``"layernorm"``, ``"rmsnorm"`` or None: what ``module`` computes over its last dim.

    The input has the shape the module saw in the model (more rows, so s and b are
    over-determined), rows scaled and shifted at random.  With ``eps`` given, the
    fitted norm must also hold, with that eps, on rows whose variance is about eps.
    """
    if len(shape) < 2 or shape[-1] < 4:
        return None
    gen = torch.Generator().manual_seed(2)
    shape = (max(shape[0], 1) * max(1, 96 // shape[:-1].numel()), *shape[1:])
    rows = (*shape[:-1], 1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.exp(0.5 * torch.randn(rows, generator=gen, dtype=torch.float64))
    x = x + 2 * torch.randn(rows, generator=gen, dtype=torch.float64)
    clone = _random_copy(module)
    try:
        with torch.no_grad():
            out = clone(x.float())
    except Exception:  # noqa: BLE001 - a module that cannot run on one tensor is no plain norm
        return None
    if not torch.is_tensor(out) or out.shape != x.shape:
        return None
    out = out.double()
    for kind in ("layernorm", "rmsnorm"):
        s, b = _affine_fit(out, _normalized(x, kind))
        if _close(out, s * _normalized(x, kind) + b):
            break
    else:
        return None
    if eps is not None:
        tiny = torch.randn(shape, generator=gen, dtype=torch.float64) * eps ** 0.5
        with torch.no_grad():
            out = clone(tiny.float()).double()
        if not _close(out, s * _normalized(tiny, kind, eps) + b):
            return None
    return kind


def probe_norms(model, inputs) -> tuple[dict[str, str], dict[str, torch.Size]]:
    shapes = leaf_input_shapes(model, inputs)
    kinds = {name: probe(model.get_submodule(name), shape) for name, shape in shapes.items()}
    return {name: kind for name, kind in kinds.items() if kind}, shapes


# --- the tests ---------------------------------------------------------------------------

def replaced_in_model(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, _ParameterFreeNorm)}


def check_patch_cycle(model, inputs, expected: dict[str, str], shapes, reference, **options):
    originals = {name: model.get_submodule(name) for name in expected}
    report = patch_model(model, "adanorm", **options)
    reported = {e.name: e.kind for e in report.replaced}
    assert reported == expected, (f"replaced but no probed norm: {sorted(set(reported) - set(expected))}; "
                                  f"missed: {sorted(set(expected) - set(reported))}")
    assert replaced_in_model(model) == set(expected)
    for name, kind in expected.items():  # right family, and the eps the original really uses
        new = model.get_submodule(name)
        assert new.centre == (kind == "layernorm"), name
        assert probe(originals[name], shapes[name], eps=new.eps) == kind, f"{name}: eps={new.eps}"
    patched = run(model, inputs)
    assert [t.shape for t in patched] == [t.shape for t in reference]
    assert all(torch.isfinite(t).all() for t in patched if t.is_floating_point())
    assert any(not torch.equal(a, b) for a, b in zip(patched, reference)), "patch changed nothing"
    unpatch_model(model)
    assert replaced_in_model(model) == set()
    restored = run(model, inputs)
    assert len(restored) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(restored, reference))


@pytest.mark.parametrize("arch", [a.param() for a in ARCHS])
def test_patch_finds_exactly_the_last_dim_norms(arch):
    model = build(arch)
    inputs = make_inputs(arch, model)
    reference = run(model, inputs)
    assert reference and reference[0].shape[0] == BATCH
    probed, shapes = probe_norms(model, inputs)
    assert bool(probed) == arch.has_norms, sorted(probed)
    if arch.fact:
        assert arch.fact[1](model, probed), f"expected {arch.fact[0]}"
    for cls in arch.rejected:  # the decoys are in the model and the probe turned them down
        assert any(type(m).__name__ == cls and n not in probed for n, m in model.named_modules()), cls
    layernorms = {n: k for n, k in probed.items() if k == "layernorm"}

    if layernorms:
        check_patch_cycle(model, inputs, layernorms, shapes, reference)
    else:  # a clear error, the model untouched
        before = list(model.named_modules())
        with pytest.raises(ValueError, match="include_rmsnorm" if probed else "no LayerNorm"):
            patch_model(model, "adanorm")
        assert list(model.named_modules()) == before
    if len(probed) > len(layernorms):
        check_patch_cycle(model, inputs, probed, shapes, reference, include_rmsnorm=True)


@pytest.mark.parametrize("model_type, options, expected", [
    ("llama", dict(include_rmsnorm=True),  # LlamaConfig defaults: the 7B shape
     lambda c: {f"layers.{i}.{n}" for i in range(c.num_hidden_layers)
                for n in ("input_layernorm", "post_attention_layernorm")} | {"norm"}),
    ("bert", {},  # BERT-large
     lambda c: {f"encoder.layer.{i}.{n}.LayerNorm" for i in range(c.num_hidden_layers)
                for n in ("attention.output", "output")} | {"embeddings.LayerNorm"}),
], ids=["llama-7b", "bert-large"])
def test_full_size_models_on_meta_device(model_type, options, expected):
    sizes = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096) if model_type == "bert" else {}
    config = AutoConfig.for_model(model_type, **sizes)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    report = patch_model(model, "adanorm", **options)
    names = {e.name for e in report.replaced}
    assert names == expected(config) and len(names) == {"llama": 65, "bert": 49}[model_type]
    assert replaced_in_model(model) == names
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    unpatch_model(model)
    assert replaced_in_model(model) == set()
    assert all(t.is_meta for t in model.parameters())


def test_enough_architectures():
    assert len({a.id for a in ARCHS}) >= 30


class _CountingLayerNorm(nn.Module):
    """A LayerNorm that counts its calls in a buffer, in place."""

    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


def test_detection_leaves_buffers_untouched():
    model = nn.Sequential(nn.Linear(8, 8), _CountingLayerNorm(8))
    report = patch_model(model, "adanorm", dry_run=True)
    assert [e.name for e in report.replaced] == ["1"]
    assert model[1].calls.item() == 0
