"""Trainer callbacks that watch the norms train: gradient statistics, AdaNorm's factor, affine drift.

Each measures on optimizer steps ``every_n_steps, 2 * every_n_steps, ...`` only and
hands its values to the Trainer's logging on that step (``state.log_history``,
``trainer_state.json``, the console and the ``report_to`` integrations, ahead of which
the monitors move themselves; see docs/trainer.md).
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler
from transformers.utils import logging

from .detect import classify
from .functional import normalize
from .blend import blends_of, inside
from .grad_stats import STATISTICS, GradientProbe, find_norm_sites
from .norms import AdaNorm, _is_int
from .patch import get_patch_record
from .wrappers import inner_model

logger = logging.get_logger(__name__)


class _PeriodicMonitor(TrainerCallback):
    """Measure on every ``every_n_steps``-th optimizer step; log through the Trainer.

    Values go out as ``{prefix}/{module name}/{statistic}`` (when ``per_layer``) and
    ``{prefix}/all/{statistic}`` (aggregated over norms), merged into the logs of
    the measuring step, whose logging this callback requests.
    """

    prefix = ""

    def __init__(self, every_n_steps: int = 50, per_layer: bool = True):
        if not _is_int(every_n_steps) or every_n_steps < 1:
            raise ValueError(f"{type(self).__name__}: every_n_steps must be a positive integer (measure "
                             f"on every n-th optimizer step), got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self._pending: dict[str, float] = {}

    def is_measuring_step(self, step: int) -> bool:
        """``step`` counts optimizer steps from 1, like ``state.global_step`` once the step is done."""
        return step % self.every_n_steps == 0

    def _publish(self, per_layer: dict[str, dict[str, float]], overall: dict[str, float]) -> None:
        if self.per_layer:
            for layer, stats in per_layer.items():
                self._pending.update({f"{self.prefix}/{layer}/{k}": v for k, v in stats.items()})
        self._pending.update({f"{self.prefix}/all/{k}": v for k, v in overall.items()})

    def _run_before_the_reporters(self) -> None:
        """Move the monitors ahead of every other callback of the Trainer.

        The Trainer puts its ``report_to`` integrations (TensorBoard, W&B ...) before the
        user's callbacks, and values merged into ``logs`` after them never reach them.
        Callbacks are not handed their ``CallbackHandler``; it is the caller of this event.
        A new list is assigned, so the event loop in progress runs on unchanged.
        """
        frame, handler = sys._getframe(1), None
        while frame is not None and not isinstance(handler, CallbackHandler):
            handler, frame = frame.f_locals.get("self"), frame.f_back
        if not isinstance(handler, CallbackHandler) or self not in handler.callbacks:
            logger.warning("%s could not move itself ahead of the report_to callbacks; its values "
                           "reach state.log_history but may miss TensorBoard/W&B", type(self).__name__)
            return
        monitors = [cb for cb in handler.callbacks if isinstance(cb, _PeriodicMonitor)]
        if handler.callbacks[:len(monitors)] != monitors:
            handler.callbacks = monitors + [cb for cb in handler.callbacks if cb not in monitors]

    def on_init_end(self, args, state, control, **kwargs):
        self._run_before_the_reporters()

    def on_train_begin(self, args, state, control, **kwargs):
        self._run_before_the_reporters()  # again, for a monitor added with trainer.add_callback

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        if state.log_history:  # Trainer.log appended a copy of `logs` just before on_log
            state.log_history[-1].update(self._pending)
        self._pending = {}


def _mean_over_layers(per_layer: dict[str, dict[str, float]], keys) -> dict[str, float]:
    out = {}
    for key in keys:
        values = [stats[key] for stats in per_layer.values() if key in stats]
        if values:
            out[key] = math.fsum(values) / len(values)
    return out


def _loss_scale(optimizer) -> float:
    """The loss scale of fp16 training (accelerate's optimizer wrapper holds the GradScaler), else 1.
    The hooks see the gradients of the scaled loss: 65536 times the real ones at the usual scale."""
    scaler = getattr(optimizer, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


class NormGradientStatsCallback(_PeriodicMonitor):
    """How every norm re-centres and re-scales the gradient, measured on the live backward pass.

    For each patched or original norm, logs ``norm_grad/<module>/<statistic>`` and
    the mean over norms ``norm_grad/all/<statistic>`` for the statistics
    ``grad_out_mean``, ``grad_out_var``, ``grad_in_mean``, ``grad_in_var``,
    ``recentring`` and ``rescaling`` defined in :mod:`hf_adanorm.grad_stats`
    (for LayerNorm-simple ``recentring`` 0 and ``rescaling <= 1``: the paper's Theorem 1; AdaNorm's
    factor can re-scale above 1).  Hooks are
    attached in ``on_step_begin`` of a measuring step only and removed in
    ``on_pre_optimizer_step``, once every micro-batch's backward is done; other
    steps run with no hook at all. Under fp16 with a GradScaler the statistics are
    of the unscaled gradients (the step's loss scale is divided out).
    """

    prefix = "norm_grad"

    def __init__(self, every_n_steps: int = 50, per_layer: bool = True):
        super().__init__(every_n_steps, per_layer)
        self.probe: Optional[GradientProbe] = None
        self.loss_scale = 1.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        sites = find_norm_sites(model)
        if not sites:
            raise ValueError("NormGradientStatsCallback: the model has no LayerNorm/RMSNorm-like module "
                             "(original or patched by hf_adanorm); there is nothing to measure.")
        self.probe = GradientProbe(sites)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.is_measuring_step(state.global_step + 1):
            self.loss_scale = _loss_scale(optimizer)  # the one this step's backward passes are scaled by
            self.probe.attach()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.probe.num_hooks:
            self.probe.detach()
            per_layer = self.probe.collect(self.loss_scale)
            self._publish(per_layer, _mean_over_layers(per_layer, STATISTICS))

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.detach()


class AdaNormMonitorCallback(_PeriodicMonitor):
    """Where AdaNorm's factor ``phi = C (1 - k y)`` stops being a mild positive scaling.

    The paper picks ``k`` so that ``phi > 0`` for the ``y`` seen in practice; it
    fails when ``k |y| >= 1``.  Over the training forward passes of a measuring
    step, for every :class:`~hf_adanorm.AdaNorm` (and RMS variant) it logs
    ``adanorm/<module>/frac_k_abs_y_ge_1`` (fraction of elements with
    ``k |y| >= 1``), ``factor_min`` and ``factor_max`` (range of ``phi``), and the
    same over all AdaNorms under ``adanorm/all/``.
    """

    prefix = "adanorm"

    def __init__(self, every_n_steps: int = 50, per_layer: bool = True):
        super().__init__(every_n_steps, per_layer)
        self._modules: dict[str, AdaNorm] = {}
        self._handles = []
        self._seen: dict[str, list] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        model = inner_model(model)  # a PeftModel: the patched model inside it, under its own names
        blends = blends_of(model)  # a norm being blended in is logged under its own name, not '<name>.target'
        self._modules = {name: m for name, m in model.named_modules() if isinstance(m, AdaNorm) and not inside(name, blends)}
        self._modules.update({name: blend.target for name, blend in blends.items() if isinstance(blend.target, AdaNorm)})
        if not self._modules:
            raise ValueError("AdaNormMonitorCallback: the model has no AdaNorm module; patch it with "
                             "'adanorm' first (e.g. Trainer(..., callbacks=[PatchCallback('adanorm'), ...])).")

    def on_step_begin(self, args, state, control, **kwargs):
        if self.is_measuring_step(state.global_step + 1) and not self._handles:
            for name, module in self._modules.items():
                hook = self._make_hook(name)
                self._handles.append(module.register_forward_hook(hook))

    def _make_hook(self, name: str):
        def record(module: AdaNorm, args, output):
            with torch.no_grad():
                # float32 before normalizing: y of a bf16 input rounded to bf16 is off by 1e-3
                y = normalize(args[0].detach().float(), len(module.normalized_shape), module.eps,
                              centre=module.centre, eps_mode=module.eps_mode)
                beyond = (module.k * y.abs() >= 1).sum()
                # phi is decreasing in y, so its extremes sit at the extremes of y.
                phi_min, phi_max = module.C * (1 - module.k * y.max()), module.C * (1 - module.k * y.min())
                self._seen.setdefault(name, []).append(
                    torch.stack([y.new_tensor(float(y.numel())), beyond.float(), phi_min, phi_max]))
        return record

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        per_layer, total, beyond = {}, 0.0, 0.0
        for name, calls in self._seen.items():
            rows = torch.stack(calls).double().cpu()
            n, k = rows[:, 0].sum().item(), rows[:, 1].sum().item()
            per_layer[name] = {"frac_k_abs_y_ge_1": k / n, "factor_min": rows[:, 2].min().item(),
                               "factor_max": rows[:, 3].max().item()}
            total, beyond = total + n, beyond + k
        self._seen.clear()
        if per_layer:
            self._publish(per_layer, {
                "frac_k_abs_y_ge_1": beyond / total,
                "factor_min": min(s["factor_min"] for s in per_layer.values()),
                "factor_max": max(s["factor_max"] for s in per_layer.values())})

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class AffineDriftCallback(_PeriodicMonitor):
    """How far the gain and bias of the LayerNorms left unpatched are from the identity.

    The paper argues these parameters over-fit.  After each measuring step it logs
    ``affine/<module>/gain_dev = ||gamma - 1||_2`` and ``bias_norm = ||beta||_2``
    (``gamma`` is the effective gain, ``1 + w`` for norms that store ``w``), and
    their means over norms under ``affine/all/``.  No hooks: it reads parameters.
    """

    prefix = "affine"

    def __init__(self, every_n_steps: int = 50, per_layer: bool = True):
        super().__init__(every_n_steps, per_layer)
        self._norms = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        model = inner_model(model)  # a PeftModel: the model inside it, whose names the patch record holds
        patched = set((get_patch_record(model) or {}).get("modules", {}))
        blends = blends_of(model)  # a norm being blended in: its original is a frozen copy, dropped at the end
        self._norms = {}
        for name, module in model.named_modules():
            if not name or name in patched or inside(name, blends):
                continue
            info, _ = classify(module)
            if info is not None and (info.gain or info.bias):
                self._norms[name] = (module, info)
        if not self._norms:
            raise ValueError("AffineDriftCallback: the model has no unpatched norm with a gain or bias "
                             "(all were replaced by parameter-free hf_adanorm norms, or it has none).")

    def on_step_end(self, args, state, control, **kwargs):
        if self.is_measuring_step(state.global_step):
            per_layer = {}
            with torch.no_grad():
                for name, (module, info) in self._norms.items():
                    stats = {}
                    if info.gain:
                        gain = getattr(module, info.gain).float() + info.gain_offset
                        stats["gain_dev"] = (gain - 1).norm().item()
                    if info.bias:
                        stats["bias_norm"] = getattr(module, info.bias).float().norm().item()
                    per_layer[name] = stats
            self._publish(per_layer, _mean_over_layers(per_layer, ("gain_dev", "bias_norm")))
        super().on_step_end(args, state, control, **kwargs)
