"""``GradualSwapCallback``: the conversion's gradual swap inside ``transformers.Trainer``.

Where ``PatchCallback`` swaps every norm at once when the Trainer is built, this callback
swaps them in over the first ``ramp_steps`` optimizer steps of fine-tuning: each norm
computes (1 − α)·original(x) + α·new(x) (see :mod:`hf_adanorm.convert.schedule`), α moving
from 0 to 1 with the schedule, and once every α is 1 the originals are dropped. The task
loss alone guides the model through the swap (there is no teacher, unlike ``hf-adanorm
convert``). The originals are frozen copies, so the optimizer never trains their gains and
biases; checkpoints written during the ramp carry them and resume the ramp exactly.
"""

from __future__ import annotations

import copy

from accelerate.utils import extract_model_from_parallel

from ..callbacks import PatchCallback
from ..patch import get_patch_record, is_patched, patch_model
from .schedule import SCHEDULES, alphas, blend_sources, set_alphas, unwrap_norms, wrap_norms


class GradualSwapCallback(PatchCallback):
    """``Trainer(model, args, callbacks=[GradualSwapCallback("adanorm", ramp_steps=200)])``.

    ``ramp_steps`` (> 0): optimizer steps over which the norms are blended in; ``schedule``:
    'blend' (all together) or 'layerwise' (one after another). Other arguments are those of
    :func:`hf_adanorm.patch_model`.
    """

    def __init__(self, norm="adanorm", *, ramp_steps: int, schedule: str = "blend", filter_fn=None, **options):
        if schedule not in SCHEDULES or schedule == "swap":
            raise ValueError(f"schedule must be 'blend' or 'layerwise' ('swap' is PatchCallback), got {schedule!r}")
        if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1:
            raise ValueError(f"ramp_steps must be an integer >= 1, got {ramp_steps!r}")
        super().__init__(norm, filter_fn=filter_fn, **options)
        self.ramp_steps, self.schedule = ramp_steps, schedule
        self.wrapped = None

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if is_patched(model):
            raise RuntimeError("GradualSwapCallback blends a model's own norms into the new ones: pass the "
                               "original (unpatched) model, or use PatchCallback for a patched one")
        plan = patch_model(model, self.config, filter_fn=self.filter_fn, dry_run=True)
        originals = {e.name: copy.deepcopy(model.get_submodule(e.name)) for e in plan.replaced}
        super().on_init_end(args, state, control, model=model, optimizer=optimizer, **kwargs)
        record = get_patch_record(model)
        self.wrapped = wrap_norms(model, blend_sources(record, lambda name: originals[name]))
        self._model = model
        set_alphas(self.wrapped, [0.0] * len(self.wrapped))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.wrapped is None:
            return
        values = alphas(self.schedule, state.global_step, self.ramp_steps, len(self.wrapped))
        if min(values) >= 1.0:  # fully swapped: only the new norms from here on
            unwrap_norms(extract_model_from_parallel(self._model), self.wrapped)
            self.wrapped = None
            return
        set_alphas(self.wrapped, values)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.wrapped is not None:  # training stopped inside the ramp: finish the swap
            unwrap_norms(extract_model_from_parallel(self._model), self.wrapped)
            self.wrapped = None
