"""Second derivatives, torch.func and forward-mode AD of every norm, against plain autograd.

The references never call hf_adanorm: ``test_norms.reference`` (the paper's equations with
``.detach()`` where the paper puts it) for one norm, and for a whole model the same model
whose norms run that reference.  Autograd's derivatives of the reference, to any order, are
the definition: the AdaNorm factor and any detached statistic stay constant in all of them.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import hf_adanorm
from hf_adanorm.norms import _ParameterFreeNorm
from test_norms import EPS_MODES, VARIANTS, Variant, by_id, reference, rows

pytestmark = pytest.mark.usefixtures("one_thread")

NORMALIZING = [v for v in VARIANTS if not v.identity]
# Nothing detached: the backward is the true derivative, so torch's own gradgradcheck applies.
UNDETACHED = [v for v in NORMALIZING if not (v.k or v.detach_mean or v.detach_scale)]
all_modes = pytest.mark.parametrize("eps_mode", EPS_MODES)


def vjp(fn, x, g):
    """``dL/dx`` of ``L = sum(fn(x) * g)``, itself differentiable."""
    (dx,) = torch.autograd.grad(fn(x), x, g, create_graph=True)
    return dx


# ---------------------------------------------------------------- one norm, float64

@by_id(UNDETACHED)
@all_modes
def test_gradgradcheck_float64(variant, eps_mode):
    x = rows(2, 3, 6, seed=1).requires_grad_(True)
    assert torch.autograd.gradgradcheck(variant.make(6, 1e-3, eps_mode), (x,), atol=1e-6, rtol=1e-5)


@by_id(NORMALIZING)
@all_modes
def test_gradgradcheck_of_the_frozen_function_float64(variant, eps_mode):
    """gradcheck of the backward ``(x, g) -> dL/dx`` itself, for every norm.

    As in test_norms.test_gradcheck_float64: a detached quantity is held at its value at
    ``x0``, so the numerical side differentiates the reference's backward with it frozen
    there, while the analytical side is the norm's own double backward.
    """
    x0, g0 = rows(2, 3, 6, seed=1), rows(2, 3, 6, seed=4, offset=False)
    module = variant.make(6, 1e-3, eps_mode)

    def backward_with_frozen_value(x, g):
        dx = vjp(module, x, g)
        frozen = vjp(lambda t: reference(variant, t, 1e-3, eps_mode, frozen_at=x0), x, g)
        return dx + (frozen - dx).detach()

    inputs = (x0.clone().requires_grad_(True), g0.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(backward_with_frozen_value, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_the_frozen_check_sees_a_live_factor():
    """The frozen trick must not hide a factor that is differentiated in the second order."""
    x0, g0 = rows(2, 3, 6, seed=1), rows(2, 3, 6, seed=4, offset=False)
    adanorm = next(v for v in VARIANTS if v.id == "adanorm_k0.4_C2")
    live = dataclasses.replace(adanorm, k=0.0, C=1.0)

    def backward_with_live_factor(x, g):  # J^T (phi g), the right value, with phi = C (1 - k y) live in x
        y = reference(live, x, 1e-3, "torch")
        (dx,) = torch.autograd.grad(y, x, adanorm.C * (1 - adanorm.k * y) * g, create_graph=True)
        return dx

    def backward_with_frozen_value(x, g):
        dx = backward_with_live_factor(x, g)
        frozen = vjp(lambda t: reference(adanorm, t, 1e-3, "torch", frozen_at=x0), x, g)
        return dx + (frozen - dx).detach()

    inputs = (x0.clone().requires_grad_(True), g0.clone().requires_grad_(True))
    assert not torch.autograd.gradcheck(backward_with_frozen_value, inputs, eps=1e-6, atol=1e-6, rtol=1e-5,
                                        raise_exception=False)


@by_id(NORMALIZING)
@all_modes
@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_double_backward_equals_plain_autograd(variant, eps_mode, kernels, cpu_kernels_mode):
    """Hessian-vector products in x and g; in float32 the forward runs on the C++ kernels."""
    cpu_kernels_mode(kernels)
    dtype, tol = (torch.float32, 1e-4) if kernels == "auto" else (torch.float64, 1e-10)
    x, g, w = (rows(4, 24, seed=s, offset=s == 5).to(dtype).requires_grad_(True) for s in (5, 6, 7))
    module = variant.make(24, 1e-5, eps_mode)

    def second(fn):
        dx = vjp(fn, x, g)
        # With sigma detached, dL/dx does not depend on x at all: a zero second derivative.
        return torch.autograd.grad((dx * w).sum(), (x, g), allow_unused=True, materialize_grads=True)

    got = second(module)
    want = second(lambda t: reference(variant, t, 1e-5, eps_mode))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@by_id(NORMALIZING)
@all_modes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plain_formulas_equal_the_kernels(variant, eps_mode, dtype, cpu_kernels_mode):
    """norm_math.decomposed (traces, ONNX, HF_ADANORM_COMPILED_NORMS=math) under plain autograd,
    against the C++ kernels: outputs and gradients, a constant row included (finite there)."""
    from hf_adanorm import norm_math
    cpu_kernels_mode("auto")
    x, g = rows(5, 40, seed=11).to(dtype), rows(5, 40, seed=12, offset=False).to(dtype)
    x[2] = 0.75
    module = variant.make(40, 1e-5, eps_mode)
    conf = (1e-5, variant.centre, eps_mode == "fairseq", variant.detach_mean, variant.detach_scale,
            variant.k, variant.C)
    got = [t.float() for t in grad_pair(lambda t: norm_math.decomposed(t, 1, *conf), x, g)]
    want = [t.float() for t in grad_pair(module, x, g)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, want):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def grad_pair(fn, x, g):
    x = x.clone().requires_grad_(True)
    z = fn(x)
    return z.detach(), torch.autograd.grad(z, x, g)[0]


def test_hessian_of_a_norm_is_not_zero():
    """The issue's case: ``torch.autograd.functional.hessian`` of a norm alone was all zeros."""
    module = hf_adanorm.LayerNormSimple(6)
    x, w = rows(1, 6, seed=2)[0], rows(1, 6, seed=3)[0]
    hessian = torch.autograd.functional.hessian(lambda t: (module(t) * w).sum().square(), x)
    want = torch.autograd.functional.hessian(
        lambda t: (reference(VARIANTS[0], t, 1e-5, "torch") * w).sum().square(), x)
    assert want.norm() > 1
    torch.testing.assert_close(hessian, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- whole models

def tiny_bert(norm: str, dtype=torch.float64, **norm_args):
    from transformers import AutoModelForSequenceClassification, BertConfig
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    hf_adanorm.patch_model(model, norm, **norm_args)
    return model.to(dtype).eval()


def plain_autograd_twin(model):
    """A copy of ``model`` whose hf_adanorm norms run the plain-autograd reference instead."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, _ParameterFreeNorm):
            detach = getattr(module, "detach", "")
            variant = Variant("twin", type(module), centre=module.centre, k=getattr(module, "k", 0.0),
                              C=getattr(module, "C", 1.0), detach_mean=detach in ("mean", "both"),
                              detach_scale=detach in ("variance", "both"))
            module.forward = (lambda t, v=variant, m=module: reference(v, t, m.eps, m.eps_mode))
    return twin


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def relative_error(got, want):
    return ((flat(got) - flat(want)).norm() / flat(want).norm()).item()


MODEL_NORMS = [("adanorm", {}), ("layernorm_simple", {}), ("detachnorm", dict(detach="mean"))]
model_norms = pytest.mark.parametrize("norm,norm_args", MODEL_NORMS, ids=[n for n, _ in MODEL_NORMS])
IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1])


@model_norms
def test_hessian_vector_product_of_a_tiny_model(norm, norm_args):
    model = tiny_bert(norm, **norm_args)
    params = [p for p in model.parameters()]
    direction = [torch.randn_like(p) for p in params]

    def hvp(m):
        ps = list(m.parameters())
        grads = torch.autograd.grad(m(input_ids=IDS, labels=LABELS).loss, ps, create_graph=True)
        return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, direction)), ps)

    want = hvp(plain_autograd_twin(model))
    assert flat(want).norm() > 0
    assert relative_error(hvp(model), want) < 1e-6


@model_norms
def test_gradient_penalty_of_a_tiny_model(norm, norm_args):
    model = tiny_bert(norm, **norm_args)

    def penalty_grads(m):
        embeds = m.bert.embeddings.word_embeddings(IDS).detach().requires_grad_(True)
        loss = m(inputs_embeds=embeds, labels=LABELS).loss
        (grad,) = torch.autograd.grad(loss, embeds, create_graph=True)
        ps = [p for n, p in m.named_parameters() if "word_embeddings" not in n]
        return torch.autograd.grad(grad.square().sum(), ps)

    want = penalty_grads(plain_autograd_twin(model))
    assert flat(want).norm() > 0
    assert relative_error(penalty_grads(model), want) < 1e-6


# ---------------------------------------------------------------- torch.func and forward-mode AD

@pytest.fixture(scope="module")
def models():
    model = tiny_bert("adanorm", k=0.3)
    return model, plain_autograd_twin(model)


def embeds_of(model):
    return model.bert.embeddings.word_embeddings(IDS).detach()


def params_of(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def loss_fn(model):
    def loss(params, embeds, labels):
        out = torch.func.functional_call(model, params, (), dict(inputs_embeds=embeds, labels=labels))
        return out.loss
    return loss


def assert_same(got, want, tol=1e-9):
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want) and flat(want).norm() > 0
    assert relative_error(got, want) < tol


def test_func_grad(models):
    model, twin = models
    got = torch.func.grad(loss_fn(model))(params_of(model), embeds_of(model), LABELS)
    want = torch.func.grad(loss_fn(twin))(params_of(twin), embeds_of(twin), LABELS)
    assert_same(got, want)


def test_func_vmap_per_sample_gradients(models):
    model, twin = models

    def per_sample(m):
        one = lambda p, e, y: loss_fn(m)(p, e.unsqueeze(0), y.unsqueeze(0))  # noqa: E731
        return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params_of(m), embeds_of(m), LABELS)

    got, want = per_sample(model), per_sample(twin)
    assert got["classifier.weight"].shape[0] == 2
    assert_same(got, want)


def test_func_jacrev_and_jvp(models):
    model, twin = models
    tangent = torch.randn_like(embeds_of(model))

    def logits(m):
        return lambda e: m(inputs_embeds=e).logits

    assert_same(torch.func.jacrev(logits(model))(embeds_of(model)),
                torch.func.jacrev(logits(twin))(embeds_of(twin)))
    assert_same(torch.func.jvp(logits(model), (embeds_of(model),), (tangent,)),
                torch.func.jvp(logits(twin), (embeds_of(twin),), (tangent,)))


def test_forward_mode_ad(models):
    model, twin = models
    tangent = torch.randn_like(embeds_of(model))

    def directional(m):
        with fwAD.dual_level():
            out = m(inputs_embeds=fwAD.make_dual(embeds_of(m), tangent)).logits
            return fwAD.unpack_dual(out).tangent

    assert_same(directional(model), directional(twin))


@by_id(NORMALIZING)
@all_modes
def test_func_transforms_of_one_norm(variant, eps_mode):
    """jacrev, jacfwd and the Hessian via torch.func, for every norm and eps mode."""
    module = variant.make(5, 1e-3, eps_mode)
    ref = (lambda t: reference(variant, t, 1e-3, eps_mode))  # noqa: E731
    x, w = rows(3, 5, seed=8), rows(3, 5, seed=9, offset=False)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        assert_same(transform(module)(x), transform(ref)(x), 1e-12)
    assert_same(torch.func.hessian(lambda t: (module(t) * w).sum().square())(x),
                torch.func.hessian(lambda t: (ref(t) * w).sum().square())(x), 1e-12)
    batch = rows(3, 4, 5, seed=10)
    assert_same(torch.func.vmap(module, in_dims=1, out_dims=1)(batch), ref(batch), 1e-12)


@by_id(NORMALIZING)
@all_modes
def test_derivatives_taken_outside_a_vmap_of_one_norm(variant, eps_mode):
    """A transform or plain autograd *around* ``vmap(norm)`` (model ensembles: ``vmap`` over stacked
    weights, then ``.backward()``): each goes through the norm's own vmap rule and derivatives."""
    module = variant.make(5, 1e-3, eps_mode)
    ref = (lambda t: reference(variant, t, 1e-3, eps_mode))  # noqa: E731
    batch, w = rows(3, 4, 5, seed=11), rows(3, 4, 5, seed=12, offset=False)
    loss = (lambda f, w=w: lambda t: (torch.func.vmap(f)(t) * w).sum().square())  # noqa: E731
    assert_same(torch.func.grad(loss(module))(batch), torch.func.grad(loss(ref))(batch), 1e-12)
    assert_same(torch.func.jacrev(torch.func.vmap(module))(batch), torch.func.jacrev(ref)(batch), 1e-12)
    assert_same(torch.func.jacfwd(torch.func.vmap(module))(batch), torch.func.jacfwd(ref)(batch), 1e-12)
    small, w_small = batch[:2, :2], w[:2, :2]
    assert_same(torch.func.hessian(loss(module, w_small))(small), torch.func.hessian(loss(ref, w_small))(small),
                1e-11)
    x, x_ref = batch.clone().requires_grad_(True), batch.clone().requires_grad_(True)
    loss(module)(x).backward()
    loss(ref)(x_ref).backward()
    assert_same(x.grad, x_ref.grad, 1e-12)


@pytest.mark.parametrize("compiled_norms", ["auto", "kernels"])
@by_id([v for v in NORMALIZING if v.id in ("adanorm", "layernorm_simple", "detach_mean")])
def test_forward_mode_and_second_derivatives_inside_torch_compile(variant, compiled_norms, monkeypatch):
    """torch.compile of torch.func.jvp and of a gradient of a gradient: dynamo traces the Function without
    its forward-mode and double-backward rules, and the kernel op has none of its own, so both came out
    as zeros (AdaNorm with "auto"; every norm with "kernels"). They must equal the reference's."""
    from hf_adanorm import functional
    monkeypatch.setattr(functional, "COMPILED_NORMS", compiled_norms)
    module = variant.make(8, 1e-3, "torch")
    ref = (lambda t: reference(variant, t, 1e-3, "torch"))  # noqa: E731
    x, tangent, w = rows(4, 8, seed=13), rows(4, 8, seed=14, offset=False), rows(4, 8, seed=15, offset=False)
    func = torch.func

    def directional(f):
        return lambda a: func.jvp(f, (a,), (tangent,))[1]

    def gradient_of_gradient(f):
        return lambda a: func.grad(lambda b: (func.grad(lambda c: (f(c) ** 2 * w).sum())(b) * w).sum())(a)

    for derivative in (directional, gradient_of_gradient):
        torch._dynamo.reset()
        assert_same(torch.compile(derivative(module))(x), derivative(ref)(x), 1e-10)
