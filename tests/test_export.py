"""Tracing and export of patched modules and models: each result must equal eager.

torch.fx.symbolic_trace, torch.jit.trace + save + load, torch.export + save + load, and ONNX
export (the dynamo exporter and the legacy TorchScript one) run through onnxruntime.  The
ONNX tests skip without ``onnx``, ``onnxscript`` and ``onnxruntime`` (the ``test`` extra).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_adanorm import AdaNorm, DetachNorm, LayerNormSimple, RMSAdaNorm, RMSNormSimple, functional

pytestmark = pytest.mark.usefixtures("one_thread")


def module_stack(eps_mode: str = "torch") -> nn.Module:
    """Every kind of norm once, between Linear layers, over 3-D inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 16), AdaNorm(16, k=0.2, eps_mode=eps_mode), nn.GELU(),
        nn.Linear(16, 16), DetachNorm(16, detach="mean", eps_mode=eps_mode),
        nn.Linear(16, 16), RMSAdaNorm(16, eps_mode=eps_mode), RMSNormSimple(16, eps_mode=eps_mode),
        nn.Linear(16, 16), LayerNormSimple(16, eps_mode=eps_mode),
    ).eval()


def inputs(batch=3, seq=5):
    return torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(batch * seq))


def grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x)
    # a fixed random weighting: sum(z^2) of a normalized z is nearly constant, its gradient ~0
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return [x.grad, *(p.grad for p in model.parameters())]


def assert_equal_outputs_and_grads(traced, model, x, tol=1e-5):
    """Equal up to float32 round-off, on the scale of each tensor (five norms in a row)."""
    torch.testing.assert_close(traced(x), model(x), rtol=tol, atol=tol)
    for got, want in zip(grads(traced, x), grads(model, x)):
        torch.testing.assert_close(got, want, rtol=10 * tol, atol=10 * tol * want.abs().max().item())


@pytest.mark.parametrize("eps_mode", ["torch", "fairseq"])
def test_fx_symbolic_trace(eps_mode, cpu_kernels_mode):
    calls = cpu_kernels_mode("auto")
    model = module_stack(eps_mode)
    traced = torch.fx.symbolic_trace(model)
    assert sum(node.op == "call_function" and "normalize" in node.name for node in traced.graph.nodes) == 5
    assert_equal_outputs_and_grads(traced, model, inputs())
    assert calls == {"forward": 4 * 5, "input_grad": 2 * 5}  # the traced module runs the kernels as eager does
    with pytest.raises(RuntimeError, match=r"AdaNorm expects inputs ending in \[16\]"):
        torch.fx.symbolic_trace(nn.Sequential(AdaNorm(16)))(torch.randn(2, 8))  # the shape check is traced too


@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_jit_trace_save_and_load(kernels, cpu_kernels_mode, tmp_path):
    cpu_kernels_mode(kernels)
    model = module_stack("fairseq")
    traced = torch.jit.trace(model, (inputs(),))
    torch.jit.save(traced, tmp_path / "model.pt")
    loaded = torch.jit.load(tmp_path / "model.pt")
    assert_equal_outputs_and_grads(loaded, model, inputs())
    assert_equal_outputs_and_grads(loaded, model, inputs(batch=2, seq=9))  # other shapes too


def tiny_bert_patched(norm="adanorm"):
    from transformers import AutoModel, BertConfig

    import hf_adanorm
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="eager").eval()
    hf_adanorm.patch_model(model, norm)
    return model


def test_torch_export_save_and_load(cpu_kernels_mode, tmp_path):
    """The exported graph holds the norm as one op (hf_adanorm::forward): loaded and run, it
    calls the kernels."""
    calls = cpu_kernels_mode("auto")
    model = tiny_bert_patched()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids).last_hidden_state
    exported = torch.export.export(model, (), dict(input_ids=ids))
    assert "torch.ops.hf_adanorm.forward.default" in exported.graph_module.code
    torch.export.save(exported, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    before = calls["forward"]
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)
    assert calls["forward"] == before + 5



def test_an_exported_norm_is_for_inference_and_says_so_when_differentiated():
    """The op does not carry DetachNorm's detach flags (only the module knows them), so it has no
    autograd formula of its own: a backward through the exported graph must fail, not guess one."""
    for norm in (DetachNorm(8, detach="both"), AdaNorm(8)):
        exported = torch.export.export(norm, (torch.randn(2, 8),)).module()
        x = torch.randn(2, 8, requires_grad=True)
        with pytest.raises(RuntimeError, match="no autograd formula was registered"):
            exported(x).sum().backward()


@pytest.fixture
def onnxruntime():
    for package in ("onnx", "onnxscript"):
        pytest.importorskip(package, reason="pip install hf_adanorm[test] (onnx, onnxscript, onnxruntime)")
    return pytest.importorskip("onnxruntime", reason="pip install hf_adanorm[test]")


def run_onnx(onnxruntime, path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("eps_mode", ["torch", "fairseq"])
def test_onnx_export_runs_in_onnxruntime(dynamo, eps_mode, onnxruntime, cpu_kernels_mode, tmp_path):
    """The C++ kernels stay on: the export records the norms as plain ONNX ops."""
    cpu_kernels_mode("auto")
    model = module_stack(eps_mode)
    path = tmp_path / "model.onnx"
    batch = torch.export.Dim("batch") if dynamo else None
    dynamic = dict(dynamic_shapes=({0: batch},)) if dynamo else dict(dynamic_axes={"x": {0: "batch"}})
    torch.onnx.export(model, (inputs(),), str(path), dynamo=dynamo, input_names=["x"], **dynamic)
    for x in (inputs(), inputs(batch=4)):
        torch.testing.assert_close(run_onnx(onnxruntime, path, x), model(x).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_onnx_export_of_a_patched_model(onnxruntime, cpu_kernels_mode, tmp_path):
    cpu_kernels_mode("auto")
    model = tiny_bert_patched("layernorm_simple")
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "bert.onnx"
    torch.onnx.export(model, (ids,), str(path), dynamo=True, input_names=["input_ids"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])
    torch.testing.assert_close(got, model(input_ids=ids).last_hidden_state.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("compiled_norms", ["kernels", "auto", "math"])
@pytest.mark.parametrize("eps_mode", ["torch", "fairseq"])
def test_torch_compile_runs_the_kernels_without_graph_breaks(eps_mode, compiled_norms, cpu_kernels_mode, monkeypatch):
    """fullgraph=True fails on any graph break; outputs and gradients equal eager. Inside the
    compiled code the kernels run for every norm with "kernels", for none with "math", and with
    "auto" on CPU for the two AdaNorms only (the others trace the math, measured faster)."""
    calls = cpu_kernels_mode("auto")
    monkeypatch.setattr(functional, "COMPILED_NORMS", compiled_norms)
    model = module_stack(eps_mode)
    x = inputs()
    want = grads(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    before, failed_before = dict(calls), functional.failed_calls["cpu"]
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads(compiled, x), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # 5 norms: 2 forwards each (the inference call and the training step), 1 backward each; the
    # eager reference calls above add 5 forwards
    compiled = {"kernels": 5, "auto": 2, "math": 0}[compiled_norms]  # norms that call the kernels
    assert calls["forward"] - before["forward"] == compiled * 2 + 5
    assert calls["input_grad"] - before["input_grad"] == compiled
    assert functional.failed_calls["cpu"] == failed_before
