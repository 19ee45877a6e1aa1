"""Every norm on awkward inputs and in every precision, against test_norms.py's references.

float32 and half-precision inputs run twice: on the C++ CPU kernels and on torch's eager
kernels (float64 always runs eagerly, so test_norms.py covers that path).
"""

from __future__ import annotations

import pytest
import torch

from test_norms import all_modes, all_variants, check_against_reference, grad_of, reference, rows

# ---------------------------------------------------------------- precisions

@pytest.fixture(params=["auto", "off"], ids=["cpu_kernels", "eager"])
def both_cpu_paths(request, cpu_kernels_mode):
    """Run a test on the C++ kernels and on torch's eager kernels."""
    cpu_kernels_mode(request.param)


@all_variants
@all_modes
@pytest.mark.usefixtures("both_cpu_paths")
def test_float32(variant, eps_mode):
    check_against_reference(variant, rows(4, 6, 48, dtype=torch.float32), eps_mode, rtol=1e-5, atol=1e-5)


def _half_supported(dtype):
    """Whether this CPU's torch does the ops of a norm in ``dtype`` (asks torch, not us)."""
    try:
        x = torch.randn(2, 8).to(dtype).requires_grad_(True)
        (x - x.mean(-1, keepdim=True)).pow(2).sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


@all_variants
@all_modes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.usefixtures("both_cpu_paths")
def test_half_precision(variant, eps_mode, dtype):
    """Half inputs give half outputs and gradients within 2e-2 of the float64 reference
    on the same half values.  The rows sit at ~100 with a spread of ~1, where a bf16
    mean or variance would be off by ~10% (statistics must be taken in float32)."""
    if not _half_supported(dtype):
        pytest.skip(f"torch on this CPU lacks {dtype} arithmetic")
    x = (rows(4, 6, 96, seed=8) + 100.0).to(dtype)
    check_against_reference(variant, x, eps_mode, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- awkward inputs

@all_variants
@all_modes
@pytest.mark.parametrize("hidden", [1, 2, 1023, 1500])
@pytest.mark.usefixtures("both_cpu_paths")
def test_hidden_sizes(variant, eps_mode, hidden):
    x = rows(3, hidden, dtype=torch.float32, seed=hidden)
    if hidden == 1 and variant.centre and eps_mode == "fairseq" and not variant.identity:
        # fairseq's unbiased std of one element is 0/0; the kernel takes it as 0, so
        # sigma = eps, y = x - mean = 0 and dL/dx = (g - mean(g)) / eps = 0 unless the
        # mean is detached (then g / eps).
        g = torch.rand_like(x)
        z, dx = grad_of(variant.make(1, eps=1e-5, eps_mode=eps_mode), x, g)
        assert torch.equal(z, torch.zeros_like(z))
        torch.testing.assert_close(dx, g / 1e-5 if variant.detach_mean else torch.zeros_like(g))
        return
    check_against_reference(variant, x, eps_mode, rtol=1e-5, atol=1e-5)


@all_variants
@all_modes
@pytest.mark.parametrize("shape", [(2, 3, 4, 10), (5, 10), (10,)], ids=["4d", "2d", "1d"])
def test_input_ranks(variant, eps_mode, shape):
    check_against_reference(variant, rows(*shape, seed=9), eps_mode, rtol=1e-10, atol=1e-10)


@all_variants
@all_modes
def test_normalized_shape_of_two_dims(variant, eps_mode):
    """normalized_shape (4, 6) normalizes over the last two dims together, like nn.LayerNorm."""
    x = rows(3, 4, 6, seed=10)
    z, dx = grad_of(variant.make((4, 6), eps_mode=eps_mode), x, torch.ones_like(x) + x)
    z_ref, dx_ref = grad_of(lambda t: reference(variant, t.reshape(3, 24), 1e-5, eps_mode).reshape(3, 4, 6),
                            x, torch.ones_like(x) + x)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(dx, dx_ref)


@all_variants
@all_modes
@pytest.mark.parametrize("layout", ["transposed", "strided_last_dim", "expanded_grad"])
@pytest.mark.usefixtures("both_cpu_paths")
def test_non_contiguous(variant, eps_mode, layout):
    base = rows(6, 4, 40, dtype=torch.float32, seed=11)
    module = variant.make(20 if layout == "strided_last_dim" else 40, eps_mode=eps_mode)
    if layout == "transposed":
        x = base.transpose(0, 1)
    elif layout == "strided_last_dim":
        x = base[..., ::2]
    else:
        x = base
    assert layout == "expanded_grad" or not x.is_contiguous()
    g = rows(1, 1, x.shape[-1], dtype=torch.float32, seed=12, offset=False).expand_as(x)
    xr = x.detach().requires_grad_(True)
    z = module(xr)
    (dx,) = torch.autograd.grad(z, xr, g)
    z_ref, dx_ref = grad_of(lambda t: reference(variant, t, 1e-5, eps_mode), x.double(), g.double())
    torch.testing.assert_close(z.double(), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-5)


@all_variants
@all_modes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.usefixtures("both_cpu_paths")
def test_zero_variance_rows(variant, eps_mode, dtype):
    """A constant row and an all-zero row: finite output, and the gradient's limit."""
    x = rows(4, 16, dtype=dtype, seed=13)
    x[1], x[2] = 3.25, 0.0
    degenerate = (1, 2) if variant.centre else (2,)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    z, _ = check_against_reference(variant, x, eps_mode, rtol=tol, atol=tol, degenerate_rows=degenerate)
    if variant.centre and not variant.identity:
        assert torch.equal(z[1], torch.zeros_like(z[1]))


@all_variants
@all_modes
@pytest.mark.parametrize("magnitude", [1e4, 1e-8])
@pytest.mark.usefixtures("both_cpu_paths")
def test_extreme_magnitudes(variant, eps_mode, magnitude):
    x = (rows(4, 64, seed=14) * magnitude).float()
    check_against_reference(variant, x, eps_mode, rtol=1e-5, atol=1e-5)


