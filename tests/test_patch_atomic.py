"""patch_model is atomic: a fault at any mutation step leaves model, modules and config as they were."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import hf_adanorm
from test_fold import logits, tiny_lm

# Every step that changes the model, or builds what is put into it: each fold (and its planning
# trials), the CPU offload of kept originals, the private config, each swap, the record.
FAULT_POINTS = [
    ("hf_adanorm.fold", "folded_linear"), ("hf_adanorm.fold_state", "folded_linear"),
    ("hf_adanorm.fold_state", "_to_cpu_memory"), ("hf_adanorm.fold_state", "_give_own_config"),
    ("hf_adanorm.patch", "_copy_hooks"),
    ("hf_adanorm.patch", "_keep_original_tensors"), ("hf_adanorm.patch", "swap_module"),
    ("hf_adanorm.patch", "build_record"), ("hf_adanorm.patch", "fold_summary"),
    ("hf_adanorm.patch", "set_state"), ("hf_adanorm.patch", "attach_save_pretrained"),
]
OPTIONS = dict(fold_affine=True, exact_unfold=True)  # folds, unties the LM head, keeps originals


class InjectedFault(RuntimeError):
    pass


def _wrap(monkeypatch, module_name, attr, fail_at):
    """Count calls to ``module.attr``; raise InjectedFault on call number ``fail_at`` (once)."""
    module = importlib.import_module(module_name)
    real, calls = getattr(module, attr), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise InjectedFault(f"{attr} #{fail_at}")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, attr, wrapped)
    return calls


def _snapshot(model, state_of):
    return {"state": state_of(model), "config": model.config, "config_json": model.config.to_json_string(),
            "config_refs": [(m, m.config) for m in model.modules() if "config" in vars(m)],
            "tied": model.lm_head.weight is model.get_input_embeddings().weight,
            "logits": logits(model), "vars": set(vars(model))}


def _assert_as_before(model, before, assert_unchanged):
    assert_unchanged(model, before["state"])  # module objects, tensors bitwise, flags, record attrs
    assert model.config is before["config"] and model.config.to_json_string() == before["config_json"]
    assert all(m.config is config for m, config in before["config_refs"])
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == before["tied"]
    assert set(vars(model)) == before["vars"] and not hf_adanorm.is_patched(model)
    assert torch.equal(logits(model), before["logits"])


def _calls_per_point(monkeypatch, template) -> dict:
    counters = {point: _wrap(monkeypatch, *point, fail_at=0) for point in FAULT_POINTS}
    hf_adanorm.patch_model(copy.deepcopy(template), "layernorm_simple", **OPTIONS)
    monkeypatch.undo()
    return {point: calls[0] for point, calls in counters.items()}


def test_a_fault_at_every_mutation_step_changes_nothing(monkeypatch, state_of, assert_unchanged):
    template = tiny_lm("gpt2")
    counts = _calls_per_point(monkeypatch, template)
    assert all(counts.values()), f"a fault point is never reached: {counts}"
    tried = 0
    for point, count in counts.items():
        for fail_at in range(1, count + 1):
            model = copy.deepcopy(template)
            before = _snapshot(model, state_of)
            with monkeypatch.context() as patcher:
                _wrap(patcher, *point, fail_at=fail_at)
                with pytest.raises(InjectedFault):
                    hf_adanorm.patch_model(model, "layernorm_simple", **OPTIONS)
            _assert_as_before(model, before, assert_unchanged)
            tried += 1
    assert tried >= 20
    # and after all that, a clean patch and unpatch still work
    model = copy.deepcopy(template)
    hf_adanorm.patch_model(model, "layernorm_simple", **OPTIONS)
    hf_adanorm.unpatch_model(model)
    assert torch.equal(logits(model), logits(template))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, KeyboardInterrupt])
def test_an_out_of_memory_on_the_third_fold_is_undone(monkeypatch, error, state_of, assert_unchanged):
    """The issue's case: two layers folded, then OOM. Interrupts are undone the same way."""
    model = tiny_lm("gpt2")
    before = _snapshot(model, state_of)
    import hf_adanorm.fold_state as fold
    real = fold.folded_linear
    applied = []
    real_apply = fold.apply_fold

    def apply_fold(model, plan, built, undo, exact):
        def failing(layer, gain, bias):
            applied.append(layer)
            if len(applied) == 3:
                raise error("injected on the third folded layer")
            return real(layer, gain, bias)
        monkeypatch.setattr(fold, "folded_linear", failing)
        try:
            return real_apply(model, plan, built, undo, exact)
        finally:
            monkeypatch.setattr(fold, "folded_linear", real)
    monkeypatch.setattr(hf_adanorm.patch, "apply_fold", apply_fold)
    with pytest.raises(error):
        hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True)
    assert len(applied) == 3
    _assert_as_before(model, before, assert_unchanged)


# Every step of unpatch_model that changes the model or the kept originals.
UNPATCH_FAULT_POINTS = [
    ("hf_adanorm.fold_state", "_converted_original"), ("hf_adanorm.fold_state", "_set_params"),
    ("hf_adanorm.fold_state", "_put_back_configs"), ("hf_adanorm.patch", "_restore_original_tensors"),
    ("hf_adanorm.patch", "swap_module"), ("hf_adanorm.patch", "clear_state"),
    ("hf_adanorm.patch", "detach_save_pretrained"),
]


def test_a_fault_at_every_unpatch_step_leaves_the_model_patched_and_unchanged(monkeypatch, state_of,
                                                                              assert_unchanged):
    # float64: the kept originals are converted when restored, so their undo is exercised too
    reference = tiny_lm("gpt2").to(torch.float64)
    template = tiny_lm("gpt2")
    hf_adanorm.patch_model(template, "layernorm_simple", **OPTIONS)
    template.to(torch.float64)
    counters = {point: _wrap(monkeypatch, *point, fail_at=0) for point in UNPATCH_FAULT_POINTS}
    hf_adanorm.unpatch_model(copy.deepcopy(template))
    monkeypatch.undo()
    counts = {point: calls[0] for point, calls in counters.items()}
    assert all(counts.values()), f"a fault point is never reached: {counts}"
    tried = 0
    for point, count in counts.items():
        for fail_at in range(1, count + 1):
            model = copy.deepcopy(template)
            before = {**_snapshot(model, state_of), "saver": model.save_pretrained}
            with monkeypatch.context() as patcher:
                _wrap(patcher, *point, fail_at=fail_at)
                with pytest.raises(InjectedFault):
                    hf_adanorm.unpatch_model(model)
            assert hf_adanorm.is_patched(model) and model.save_pretrained is before["saver"]
            assert_unchanged(model, before["state"])
            assert model.config is before["config"] and not before["tied"]
            assert all(m.config is config for m, config in before["config_refs"])
            assert torch.equal(logits(model), before["logits"])
            hf_adanorm.unpatch_model(model)  # the kept originals are intact: still bitwise
            assert torch.equal(logits(model), logits(reference))
            assert model.lm_head.weight is model.get_input_embeddings().weight
            tried += 1
    assert tried >= 20


def test_a_roll_back_step_that_fails_neither_stops_the_others_nor_hides_the_error():
    from hf_adanorm.patch import _roll_back
    done = []

    def broken():
        raise KeyError("gone")
    err = ValueError("the original failure")
    _roll_back([lambda: done.append("first"), broken, lambda: done.append("last")], err)
    assert done == ["last", "first"]  # newest first, past the broken one
    assert any("undoing a step failed too (KeyError" in note for note in getattr(err, "__notes__", []))
