"""Numerics of every norm against independent references, forward and backward.

The references below are plain autograd compositions of ``x.mean``, ``x.var`` and
``.sqrt()``, with ``.detach()`` exactly where the paper puts it.  They never call
``hf_adanorm.functional``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_adanorm import (AdaNorm, DetachNorm, LayerNormSimple, NoNorm, RMSAdaNorm, RMSDetachNorm,
                        RMSNormSimple)

EPS_MODES = ("torch", "fairseq")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One norm of the family, and what its reference computes."""

    id: str
    cls: type
    kwargs: dict = dataclasses.field(default_factory=dict)
    centre: bool = True  # subtract the mean (LayerNorm family) or not (RMS family)
    identity: bool = False  # NoNorm
    k: float = 0.0  # AdaNorm factor C (1 - k y), detached; k = 0 means no factor
    C: float = 1.0
    detach_mean: bool = False
    detach_scale: bool = False

    def make(self, shape, eps=1e-5, eps_mode="torch"):
        return self.cls(shape, eps=eps, eps_mode=eps_mode, **self.kwargs)


VARIANTS = [
    Variant("layernorm_simple", LayerNormSimple),
    Variant("adanorm", AdaNorm, k=0.1, C=1.0),
    Variant("adanorm_k0.4_C2", AdaNorm, dict(k=0.4, C=2.0), k=0.4, C=2.0),
    Variant("detach_mean", DetachNorm, dict(detach="mean"), detach_mean=True),
    Variant("detach_variance", DetachNorm, dict(detach="variance"), detach_scale=True),
    Variant("detach_both", DetachNorm, dict(detach="both"), detach_mean=True, detach_scale=True),
    Variant("no_norm", NoNorm, identity=True),
    Variant("rms_simple", RMSNormSimple, centre=False),
    Variant("rms_adanorm", RMSAdaNorm, dict(k=0.2, C=1.5), centre=False, k=0.2, C=1.5),
    Variant("rms_detach_mean", RMSDetachNorm, dict(detach="mean"), centre=False),  # no mean: no-op
    Variant("rms_detach_variance", RMSDetachNorm, dict(detach="variance"), centre=False,
            detach_scale=True),
    Variant("rms_detach_both", RMSDetachNorm, dict(detach="both"), centre=False, detach_scale=True),
]


def by_id(variants):
    return pytest.mark.parametrize("variant", variants, ids=[v.id for v in variants])


all_variants = by_id(VARIANTS)
all_modes = pytest.mark.parametrize("eps_mode", EPS_MODES)


def reference(v: Variant, x, eps, eps_mode, frozen_at=None, force_detach_scale=False):
    """The norm over the last dimension, written from the paper's equations.

    torch mode:   sigma = sqrt(var_population(x) + eps)   (rms: sqrt(mean(x^2) + eps))
    fairseq mode: sigma = std_unbiased(x) + eps            (rms: sqrt(mean(x^2)) + eps)
    y = (x - mean) / sigma (rms: x / sigma);  z = C (1 - k y) y.
    Detached quantities are constants: taken from ``frozen_at`` when given (to
    differentiate numerically with them held fixed), else ``.detach()``-ed.
    """
    if v.identity:
        return x
    const = (lambda f: f(frozen_at).detach()) if frozen_at is not None else (lambda f: f(x).detach())

    def mean(t):
        return t.mean(-1, keepdim=True)

    def sigma(t):
        if v.centre:
            if eps_mode == "torch":
                return (t.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
            return t.var(-1, unbiased=True, keepdim=True).sqrt() + eps
        mean_square = t.pow(2).mean(-1, keepdim=True)
        return (mean_square + eps).sqrt() if eps_mode == "torch" else mean_square.sqrt() + eps

    mu = (const(mean) if v.detach_mean else mean(x)) if v.centre else 0.0
    s = const(sigma) if (v.detach_scale or force_detach_scale) else sigma(x)
    y = (x - mu) / s
    if not v.k:
        return v.C * y
    y_for_factor = y if frozen_at is None else reference(dataclasses.replace(v, k=0.0, C=1.0),
                                                         frozen_at, eps, eps_mode)
    return (v.C * (1 - v.k * y_for_factor)).detach() * y


def rows(*shape, dtype=torch.float64, seed=0, offset=True):
    """Random rows with their own scale and (non-zero) mean, so centring matters."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = x * (0.5 + 2 * torch.rand(*shape[:-1], 1, generator=gen, dtype=torch.float64))
    if offset:
        x = x + 3 * torch.randn(*shape[:-1], 1, generator=gen, dtype=torch.float64)
    return x.to(dtype)


def grad_of(fn, x, g):
    x = x.detach().clone().requires_grad_(True)
    z = fn(x)
    (dx,) = torch.autograd.grad(z, x, g)
    return z.detach(), dx


def check_against_reference(v, x, eps_mode, eps=1e-5, *, rtol, atol, degenerate_rows=()):
    """Module (on ``x`` in its own dtype) vs reference (in float64), output and input gradient."""
    module = v.make(x.shape[-1], eps, eps_mode)
    g = rows(*x.shape, dtype=x.dtype, seed=99, offset=False)
    z, dx = grad_of(module, x, g)
    assert z.dtype == x.dtype and dx.dtype == x.dtype
    assert torch.isfinite(z).all() and torch.isfinite(dx).all()
    x64, g64 = x.double(), g.double()
    z_ref, dx_ref = grad_of(lambda t: reference(v, t, eps, eps_mode), x64, g64)
    if degenerate_rows:
        # sigma'(x) is 0/0 on a constant row, but y = 0 there, so sigma's term drops out.
        z_deg, dx_deg = grad_of(lambda t: reference(v, t, eps, eps_mode, force_detach_scale=True), x64, g64)
        for r in degenerate_rows:
            z_ref[r], dx_ref[r] = z_deg[r], dx_deg[r]
    # Absolute tolerances scale with each tensor's natural size: |z| <~ max|y|, and
    # dL/dx <~ |g| / sigma (the true gradient can be far smaller through cancellation,
    # e.g. 1 - y^2 with |y| ~ 1 for hidden sizes 1 and 2).
    xc = x64 - x64.mean(-1, keepdim=True) if v.centre else x64
    sigma = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    z_scale = z_ref.abs().max().item()
    dx_scale = max(dx_ref.abs().max().item(), 1.0 if v.identity else (g64.abs() / sigma).max().item())
    torch.testing.assert_close(z.double(), z_ref, rtol=rtol, atol=atol * z_scale)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=rtol, atol=atol * dx_scale)
    return z, dx


# ---------------------------------------------------------------- forward and backward, float64

@all_variants
@all_modes
def test_matches_reference_float64(variant, eps_mode):
    check_against_reference(variant, rows(3, 5, 16), eps_mode, rtol=1e-10, atol=1e-10)


@all_variants
@all_modes
def test_gradcheck_float64(variant, eps_mode):
    """torch.autograd.gradcheck of the backward against finite differences.

    A norm that detaches part of itself has, by design, a backward that is the
    derivative of the function with the detached quantities held at their value at
    ``x0``.  So the numerical side differentiates exactly that frozen function
    (the output value is the frozen function's, the autograd graph is the module's).
    """
    x0 = rows(2, 3, 6, seed=1)
    module = variant.make(6, 1e-3, eps_mode)

    def module_with_frozen_value(x):
        z = module(x)
        return z + (reference(variant, x, 1e-3, eps_mode, frozen_at=x0) - z).detach()

    assert torch.autograd.gradcheck(module_with_frozen_value, (x0.clone().requires_grad_(True),),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_sees_the_detach():
    """The frozen-function trick above must not hide a missing detach: full autograd differs."""
    x0 = rows(2, 3, 6, seed=1).requires_grad_(True)
    module = AdaNorm(6, eps=1e-3, k=0.4)
    assert not torch.autograd.gradcheck(module, (x0,), eps=1e-6, atol=1e-7, raise_exception=False)


# ---------------------------------------------------------------- closed forms of the paper

def closed_form_grad(v: Variant, x, g, eps):
    """The paper's input gradients, torch eps mode, g' = C (1 - k y) g (g' = g without k):

    LayerNorm-simple / AdaNorm:  (1/sigma) (g' - mean(g') - y mean(g' y))
    detach mean:                 (1/sigma) (g' - y mean(g' y))
    detach variance:             (1/sigma) (g' - mean(g'))
    detach both:                 g' / sigma
    RMS family: the same with no mean term and sigma = rms.
    """
    mu = x.mean(-1, keepdim=True) if v.centre else 0.0
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    sigma = torch.sqrt(var + eps)
    y = (x - mu) / sigma
    gp = v.C * (1 - v.k * y) * g
    dx = gp
    if v.centre and not v.detach_mean:
        dx = dx - gp.mean(-1, keepdim=True)
    if not v.detach_scale:
        dx = dx - y * (gp * y).mean(-1, keepdim=True)
    return dx / sigma


@by_id([v for v in VARIANTS if not v.identity])
def test_closed_form_input_gradient(variant):
    x, g = rows(4, 32, seed=2), rows(4, 32, seed=3, offset=False)
    module = variant.make(32, 1e-5)
    _, dx = grad_of(module, x, g)
    torch.testing.assert_close(dx, closed_form_grad(variant, x, g, 1e-5), rtol=1e-10, atol=1e-12)


def test_adanorm_forward_is_the_paper_formula():
    x = rows(4, 32, seed=4)
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(AdaNorm(32, k=0.1, C=1.0)(x), (1 - 0.1 * y) * y)
    torch.testing.assert_close(AdaNorm(32, k=0.3, C=2.5)(x), 2.5 * (1 - 0.3 * y) * y)


def fairseq_adanorm(x, eps, k, C):
    """A literal transcription of the official fairseq AdaNorm forward (k = 1/10 there)."""
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)
    x = x - mean
    mean = x.mean(-1, keepdim=True)
    graNorm = (k * (x - mean) / (std + eps)).detach()
    input_norm = (x - x * graNorm) / (std + eps)
    return input_norm * C


@pytest.mark.parametrize("k,C", [(0.1, 1.0), (0.25, 3.0)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_fairseq_mode_equals_official_adanorm(k, C, dtype, tol):
    x, g = rows(3, 7, 64, seed=5, dtype=dtype), rows(3, 7, 64, seed=6, offset=False, dtype=dtype)
    z, dx = grad_of(AdaNorm(64, eps=1e-6, k=k, C=C, eps_mode="fairseq"), x, g)
    z_ref, dx_ref = grad_of(lambda t: fairseq_adanorm(t, 1e-6, k, C), x.double(), g.double())
    torch.testing.assert_close(z.double(), z_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=tol, atol=tol)


@all_modes
def test_fairseq_and_torch_modes_differ(eps_mode):
    """Guards the mode switch itself: the two conventions give different sigma."""
    x = rows(2, 8, seed=7)
    other = "fairseq" if eps_mode == "torch" else "torch"
    assert not torch.allclose(LayerNormSimple(8, eps_mode=eps_mode)(x), LayerNormSimple(8, eps_mode=other)(x))


# ---------------------------------------------------------------- constructors

@pytest.mark.parametrize("cls", [AdaNorm, RMSAdaNorm])
@pytest.mark.parametrize("bad", [dict(k=0), dict(k=-0.1), dict(C=0), dict(C=-1.0),
                                 dict(k=float("nan")), dict(C=float("inf")), dict(k=True), dict(k="0.1")])
def test_adanorm_rejects_bad_k_and_C(cls, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=rf"{name} > 0"):
        cls(8, **bad)


def test_adanorm_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    module = AdaNorm(8, k=np.float32(0.25), C=np.int64(2))
    assert (module.k, module.C) == (0.25, 2.0)


@pytest.mark.parametrize("cls", [DetachNorm, RMSDetachNorm])
def test_detachnorm_rejects_bad_detach(cls):
    with pytest.raises(ValueError, match=r"detach must be one of \('mean', 'variance', 'both'\)"):
        cls(8, detach="gamma")


@pytest.mark.parametrize("cls", [LayerNormSimple, AdaNorm, DetachNorm, NoNorm, RMSNormSimple,
                                 RMSAdaNorm, RMSDetachNorm])
def test_rejects_bad_eps_mode(cls):
    with pytest.raises(ValueError, match=r"eps_mode must be 'torch'.*'fairseq'.*got 'pytorch'"):
        cls(8, eps_mode="pytorch")


def test_modules_hold_no_parameters_and_describe_themselves():
    module = AdaNorm([16], eps=1e-6, k=0.2, C=2.0, eps_mode="fairseq")
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    assert module.normalized_shape == (16,)
    assert repr(module) == "AdaNorm((16,), eps=1e-06, eps_mode='fairseq', k=0.2, C=2.0)"
