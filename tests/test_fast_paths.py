"""Every CPU execution path of hf_adanorm.functional against a plain-autograd reference.

The paths are: the C++ kernels (hf_adanorm.cpu_kernels, built on first use), the
eager kernels (torch's native LayerNorm ops plus in-place element-wise ops, with
e.g. detach-mean done as LayerNorm's backward plus a correction), and the C++ kernels
called from a caller's ``torch.compile``-d model.  (The Triton kernels: test_triton.py; the
differentiable formulas of hf_adanorm.norm_math: test_higher_order.py.)  The reference is written from the
paper's equations with ``.detach()`` and never calls hf_adanorm.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_adanorm import (AdaNorm, DetachNorm, LayerNormSimple, RMSAdaNorm, RMSDetachNorm,
                        RMSNormSimple, functional)


@dataclasses.dataclass(frozen=True)
class Kind:
    id: str
    make: callable
    centre: bool = True
    k: float = 0.0
    C: float = 1.0
    detach_mean: bool = False
    detach_scale: bool = False


KINDS = [
    Kind("layernorm_simple", LayerNormSimple),
    Kind("adanorm", lambda d: AdaNorm(d), k=0.1),
    Kind("adanorm_k0.4_C2", lambda d: AdaNorm(d, k=0.4, C=2.0), k=0.4, C=2.0),
    Kind("detach_mean", lambda d: DetachNorm(d, detach="mean"), detach_mean=True),
    Kind("detach_variance", lambda d: DetachNorm(d, detach="variance"), detach_scale=True),
    Kind("detach_both", lambda d: DetachNorm(d, detach="both"), detach_mean=True, detach_scale=True),
    Kind("rms_simple", RMSNormSimple, centre=False),
    Kind("rms_adanorm", lambda d: RMSAdaNorm(d, k=0.2, C=1.5), centre=False, k=0.2, C=1.5),
    Kind("rms_detach", lambda d: RMSDetachNorm(d, detach="both"), centre=False, detach_scale=True),
]
kinds = pytest.mark.parametrize("kind", KINDS, ids=[k.id for k in KINDS])


def reference(kind: Kind, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """z = C (1 - k y) y, y = (x - mu) / sqrt(var + eps); factor and chosen statistics detached."""
    mu = x.mean(-1, keepdim=True) if kind.centre else torch.zeros_like(x[..., :1])
    if kind.detach_mean:
        mu = mu.detach()
    sigma = ((x - x.mean(-1, keepdim=True)) if kind.centre else x).pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    if kind.detach_scale:
        sigma = sigma.detach()
    y = (x - mu) / sigma
    return (kind.C * (1 - kind.k * y)).detach() * y


def forward_and_grad(fn, x, g):
    x = x.detach().clone().requires_grad_(True)
    z = fn(x)
    (dx,) = torch.autograd.grad(z, x, g)
    return z.detach(), dx


def assert_matches_reference(kind, module, x, g, tol):
    z, dx = forward_and_grad(module, x, g)
    assert z.dtype == x.dtype and dx.dtype == x.dtype
    z_ref, dx_ref = forward_and_grad(lambda t: reference(kind, t), x.double(), g.double())
    # dL/dx is of size |g| / sigma; compare on that scale (cancellations make it smaller).
    torch.testing.assert_close(z.double(), z_ref, rtol=tol, atol=tol * z_ref.abs().max().item())
    torch.testing.assert_close(dx.double(), dx_ref, rtol=tol, atol=tol * dx_ref.abs().max().item())


def awkward_input(shape, dtype, seed=0):
    """Rows with their own mean (~100 for half precision) and spread; a constant row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * (0.5 + 2 * torch.rand(*shape[:-1], 1, generator=gen))
    x = x + (100.0 if dtype != torch.float32 else 3 * torch.randn(*shape[:-1], 1, generator=gen))
    x.view(-1, shape[-1])[1] = 0.75  # zero variance: y = 0, finite gradient
    g = torch.randn(*shape, generator=gen)
    return x.to(dtype), g.to(dtype)


def require_compiler():
    try:
        torch.compile(lambda t: t * 2)(torch.ones(2))
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"torch.compile does not work here ({type(err).__name__}); eager path only")


FP32, BF16, FP16 = ((37, 1023), torch.float32, 1e-5), ((2, 3, 1500), torch.bfloat16, 2e-2), \
    ((5, 130), torch.float16, 5e-3)
cases = pytest.mark.parametrize("shape,dtype,tol", [FP32, BF16, FP16],
                                ids=["fp32-37x1023", "bf16-2x3x1500", "fp16-5x130"])


@kinds
@cases
@pytest.mark.parametrize("mode", ["auto", "off"], ids=["cpu_kernels", "eager"])
def test_cpu_paths(kind, shape, dtype, tol, mode, cpu_kernels_mode):
    calls = cpu_kernels_mode(mode)
    x, g = awkward_input(shape, dtype)
    assert_matches_reference(kind, kind.make(shape[-1]), x, g, tol)
    ran = int(mode == "auto")
    assert calls == {"forward": ran, "input_grad": ran} and functional._failures["cpu"] is None
    if ran:
        assert ("cpu_forward", dtype, shape[-1], kind.centre, False) in functional.first_call_seconds


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded_grad"])
@pytest.mark.parametrize("mode", ["off", "auto"])
def test_non_contiguous_tensors(layout, mode, cpu_kernels_mode):
    cpu_kernels_mode(mode)
    base, g = awkward_input((4, 37, 2 * 1023 if layout == "strided" else 1023), torch.float32, seed=3)
    if layout == "transposed":
        x, g = base.transpose(0, 1), g.transpose(0, 1)
    elif layout == "strided":
        x, g = base[..., ::2], g[..., ::2]
    else:
        x, g = base, g[:1, :1].expand_as(base)
    for kind in (KINDS[1], KINDS[3]):  # AdaNorm and detach-mean take the most special paths
        assert_matches_reference(kind, kind.make(x.shape[-1]), x, g, 1e-5)


def test_one_row_per_thread_task_boundary(cpu_kernels_mode):
    """Rows split unevenly over threads, and single elements: every row is normalized by itself."""
    calls = cpu_kernels_mode("auto")
    for shape in [(2, 7), (3, 1), (4097, 5), (2, 40000)]:
        x, g = awkward_input(shape, torch.float32, seed=shape[0])
        assert_matches_reference(KINDS[2], KINDS[2].make(shape[-1]), x, g, 1e-5)
    assert calls == {"forward": 4, "input_grad": 4}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_non_finite_row_stays_non_finite_and_alone(dtype, cpu_kernels_mode):
    """NaN or inf in a row gives NaN there (never a finite or inf value), the other rows are untouched."""
    cpu_kernels_mode("auto")
    x, g = awkward_input((4, 40), dtype)
    x[0, 3], x[2, 7] = float("nan"), float("inf")
    x = x.requires_grad_()
    z = AdaNorm(40)(x)
    z.backward(g)
    for t in (z, x.grad):
        assert t[[0, 2]].isnan().all() and t[[1, 3]].isfinite().all()
    cpu_kernels_mode("off")
    torch.testing.assert_close(AdaNorm(40)(x)[[1, 3]], z[[1, 3]])


@pytest.mark.parametrize("path", ["cpu_kernels", "eager", "compiled_math"])
@pytest.mark.parametrize("value", [0.1, 3.7, 1000.3])
def test_a_constant_row_in_fairseq_mode_is_zero_on_every_path(path, value, cpu_kernels_mode, monkeypatch):
    """A constant row's exact output is 0 and its input gradient (g - mean g) / eps (sigma = 0 + eps). The
    mean's float32 rounding error d, left in x - mean, made fairseq's y = d / (|d| + eps) of order 1 on
    the eager and compiled paths (up to 0.98 at 1000.3)."""
    from hf_adanorm import functional
    cpu_kernels_mode("off" if path == "eager" else "auto")
    monkeypatch.setattr(functional, "COMPILED_NORMS", "math")
    norm = LayerNormSimple(768, eps_mode="fairseq")
    x = torch.full((2, 768), value, requires_grad=True)
    g = torch.randn(2, 768, generator=torch.Generator().manual_seed(0))
    if path == "compiled_math":
        torch._dynamo.reset()
        norm = torch.compile(norm)
    z = norm(x)
    z.backward(g)
    assert z.abs().max() < 1e-6
    exact = (g - g.mean(-1, keepdim=True)) / 1e-5
    assert ((x.grad - exact).abs().max() / exact.abs().max()) < 1e-5


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``module(x)``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@kinds
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["off", "auto"])
def test_saves_no_more_than_layernorm(kind, dtype, mode, cpu_kernels_mode):
    cpu_kernels_mode(mode)
    x = torch.randn(64, 96, dtype=dtype, requires_grad=True)
    assert 0 < saved_bytes(kind.make(96), x) <= saved_bytes(nn.LayerNorm(96, dtype=dtype), x)


@pytest.mark.slow
@pytest.mark.parametrize("norm, compiled_norms, runs", [("adanorm", "kernels", 3), ("adanorm", "auto", 3),
                                                        ("adanorm", "math", 0), ("layernorm_simple", "auto", 0),
                                                        ("layernorm_simple", "kernels", 3)])
def test_torch_compile_fullgraph_on_patched_model(cpu_kernels_mode, norm, compiled_norms, runs, monkeypatch):
    """fullgraph=True raises on any graph break; compiled logits and grads equal eager. The compiled
    graph calls the C++ kernels ``runs`` times each way: with "auto" on CPU for AdaNorm, while
    LayerNorm-simple traces the math, which inductor fuses (each measured faster there)."""
    require_compiler()
    calls = cpu_kernels_mode("auto")
    monkeypatch.setattr(functional, "COMPILED_NORMS", compiled_norms)
    from transformers import BertConfig, BertForSequenceClassification

    import hf_adanorm

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    hf_adanorm.patch_model(model, norm, **({"k": 0.2} if norm == "adanorm" else {}))
    ids = torch.randint(0, 64, (2, 12))

    def loss_and_grads(m):
        m.zero_grad()
        logits = m(input_ids=ids).logits
        logits.square().sum().backward()
        return logits.detach(), [p.grad.clone() for p in m.parameters()]

    logits, grads = loss_and_grads(model)
    torch._dynamo.reset()
    eager_calls = dict(calls)
    compiled_logits, compiled_grads = loss_and_grads(torch.compile(model, fullgraph=True))
    # 3 = once per norm (the embeddings' and 2 per layer)
    assert calls == {"forward": eager_calls["forward"] + runs, "input_grad": eager_calls["input_grad"] + runs}
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_benchmark_refuses_a_kernel_that_differs(monkeypatch):
    """benchmarks/bench_norms.py checks each norm against its reference before timing it."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = pytest.importorskip("bench_norms")
    x, g = awkward_input((300, 40), torch.float32)
    impl = bench.Impl("adanorm", None, "eager", bench.Math(k=0.1))
    assert bench.check(impl, AdaNorm(40), x, g) is None
    assert "output differs" in bench.check(impl, LayerNormSimple(40), x, g)
    wrong_backward = bench.Impl("detachnorm_mean", None, "eager", bench.Math(detach_mean=True))
    assert "input grad differs" in bench.check(wrong_backward, LayerNormSimple(40), x, g)
