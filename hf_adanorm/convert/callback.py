"""``GradualSwapCallback``: the conversion's gradual swap inside ``transformers.Trainer``.

Where ``PatchCallback`` swaps every norm at once when the Trainer is built, this callback
swaps them in over the first ``ramp_steps`` optimizer steps of fine-tuning: each norm
computes (1 − α)·original(x) + α·new(x) (see :mod:`hf_adanorm.convert.schedule`), α moving
from 0 to 1 with the schedule, and once every α is 1 the originals are dropped. The task
loss alone guides the model through the swap (there is no teacher, unlike ``hf-adanorm
convert``). The originals are frozen copies, so the optimizer never trains their gains and
biases; checkpoints written during the ramp carry them and resume the ramp exactly.

With ``rescale_probe`` (a batch of model inputs), post-LN norms start from the rescaled start of
:mod:`hf_adanorm.convert.rescale` instead: the Linear layers around each of them absorb its gain and
bias, and it is swapped at step 0 rather than blended. On MiniLM fine-tuned on RT it takes the
callback from 9.5 points below a separate conversion to 2.3 below (docs/conversion.md). The
rescaled Linear layers are not undone by putting the original norms back, so ``unpatch_model``
refuses such a model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..callbacks import PatchCallback, checkpoint_folder
from ..norms import _is_int
from ..patch import get_patch_record, is_patched, patch_model
from ..record import get_state
from ..training.checkpoints import write_json_atomic
from .rescale import RESCALABLE, apply_sites, output_scale, verified_sites
from .schedule import SCHEDULES, alphas, blend_sources, set_alphas, unwrap_norms, wrap_norms


SWAP_FILE = "hf_adanorm_swap.json"  # in each checkpoint: which norms started rescaled, the ramp and schedule
logger = logging.getLogger(__name__)


def _holds_blends(checkpoint) -> bool:
    """Whether a checkpoint's weights hold the frozen originals of blended norms (``<norm>.source.*``)."""
    from safetensors import safe_open
    for weights in sorted(checkpoint.glob("model*.safetensors")):
        with safe_open(str(weights), "pt") as f:
            if any(".source." in key for key in f.keys()):
                return True
    return False


class GradualSwapCallback(PatchCallback):
    """``Trainer(model, args, callbacks=[GradualSwapCallback("adanorm", ramp_steps=200)])``.

    ``ramp_steps`` (> 0): optimizer steps over which the norms are blended in; ``schedule``:
    'blend' (all together) or 'layerwise' (one after another); ``rescale_probe``: a batch of model
    inputs (``tokenizer(texts[:32], padding=True, return_tensors="pt")``) to find the post-LN norms
    that start rescaled, or None (all blend). Pass the same probe when a run resumes from a
    checkpoint, so that the model gets the same structure (checkpoints record it; another probe, or
    none, is refused). Other arguments are those of :func:`hf_adanorm.patch_model`.
    """

    resumes_a_swap = True

    def __init__(self, norm="adanorm", *, ramp_steps: int, schedule: str = "blend", rescale_probe=None,
                 filter_fn=None, **options):
        if schedule not in SCHEDULES or schedule == "swap":
            raise ValueError(f"schedule must be 'blend' or 'layerwise' ('swap' is PatchCallback), got {schedule!r}")
        if not _is_int(ramp_steps) or ramp_steps < 1:
            raise ValueError(f"ramp_steps must be an integer >= 1, got {ramp_steps!r}")
        super().__init__(norm, filter_fn=filter_fn, **options)
        if rescale_probe is not None:
            if not (isinstance(rescale_probe, Mapping) and rescale_probe
                    and all(isinstance(v, torch.Tensor) for v in rescale_probe.values())):
                raise TypeError("rescale_probe must be a batch of model inputs, a mapping of tensors such as "
                                "tokenizer(texts, padding=True, return_tensors='pt')")
            if self.config.norm not in RESCALABLE:
                raise ValueError(f"rescale_probe: only {', '.join(RESCALABLE)} start rescaled (their output is "
                                 f"about c·y), not {self.config.norm}; leave rescale_probe out")
            if self.config.fold_affine:
                raise ValueError("rescale_probe and fold_affine=True both change the Linear layers next to the "
                                 "norms: pass one of them")
        self.ramp_steps, self.schedule = ramp_steps, schedule
        self.rescale_probe = dict(rescale_probe) if rescale_probe is not None else None
        self.rescaled: list[str] = []
        self.wrapped = None
        self.training = False  # inside train(): between on_train_begin and on_train_end

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if is_patched(model):
            raise RuntimeError("GradualSwapCallback blends a model's own norms into the new ones: pass the "
                               "original (unpatched) model, or use PatchCallback for a patched one")
        plan = patch_model(model, self.config, filter_fn=self.filter_fn, dry_run=True)
        originals = {e.name: copy.deepcopy(model.get_submodule(e.name)) for e in plan.replaced}
        sites = {}
        if self.rescale_probe is not None:  # read-only on the model: it works on a float32 copy
            sites = verified_sites(model, [n for n, m in originals.items() if isinstance(m, nn.LayerNorm)],
                                   self.rescale_probe)
        super().on_init_end(args, state, control, model=model, optimizer=optimizer, **kwargs)  # checks, patches
        # the original norms' gains and biases go into the Linear layers around them (now, after the
        # patch's checks: a refusal leaves the model as it was)
        apply_sites(model, originals.__getitem__, sites, output_scale(self.config))
        self.rescaled = sorted(sites)
        if sites:
            get_state(model).extra["rescaled"] = self.rescaled  # so that unpatch_model refuses
        record = get_patch_record(model)
        sources = blend_sources(record, lambda name: originals[name])
        self.wrapped = wrap_norms(model, {name: source for name, source in sources.items() if name not in sites})
        self._model = model
        set_alphas(self.wrapped, [0.0] * len(self.wrapped))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # After step t the model is at alpha = (t - 1) / ramp_steps: only from step ramp_steps + 1 on does a
        # step train, or an evaluation see, the model that is returned and saved.
        if state.max_steps and state.max_steps <= self.ramp_steps:
            raise ValueError(f"GradualSwapCallback: ramp_steps={self.ramp_steps} is not below the run's "
                             f"{state.max_steps} steps, so no step would train the fully swapped model, and the "
                             "model returned would not be the one trained and evaluated: pass ramp_steps < the "
                             "number of steps")
        first_eval = (state.eval_steps if args.eval_strategy == "steps"
                      else math.ceil(state.max_steps / max(state.num_train_epochs, 1)) if args.eval_strategy == "epoch"
                      else None)
        if args.load_best_model_at_end and first_eval and first_eval <= self.ramp_steps:
            raise ValueError(self._best_model_refusal(first_eval))
        self.training = True
        super().on_train_begin(args, state, control, model=model, **kwargs)
        swap_file = checkpoint_folder(args, state) / SWAP_FILE
        if state.global_step == 0 or not (swap_file.parent / "config.json").is_file():
            return  # a fresh start (or a checkpoint elsewhere, which the Trainer found by path)
        if not swap_file.is_file() and not _holds_blends(swap_file.parent):
            raise RuntimeError(f"GradualSwapCallback: the run resumed from {swap_file.parent} was not trained with "
                               f"GradualSwapCallback (no {SWAP_FILE}, no blended norms in its weights); resume it "
                               "with the callback it was trained with (PatchCallback)")
        # (a checkpoint written inside the ramp before the file was written in every one: one from before
        # rescale_probe existed, so none of its norms started rescaled)
        saved = json.loads(swap_file.read_text()) if swap_file.is_file() else {"rescaled": []}
        now = self._swap_record()
        differ = [f"{key}: {saved[key]!r} then, {now[key]!r} now" for key in now
                  if key in saved and saved[key] != now[key]]  # (files from before a key existed lack it)
        if differ:  # the weights fit only the structure they were saved with, and alpha follows the schedule
            raise RuntimeError(f"GradualSwapCallback: the run resumed from {swap_file.parent} was made with another "
                               f"swap ({'; '.join(differ)}). Resume with the same ramp_steps, schedule and "
                               "rescale_probe (or none, as before).")

    def _swap_record(self) -> dict:
        return {"rescaled": self.rescaled, "ramp_steps": self.ramp_steps, "schedule": self.schedule}

    def _best_model_refusal(self, step) -> str:
        return (f"GradualSwapCallback with load_best_model_at_end: the evaluation at step {step} sees the norms "
                f"still blended in (until step {self.ramp_steps + 1}), so the 'best' checkpoint could be a model "
                "that is neither the original nor the swapped one. Evaluate and save from step "
                f"{self.ramp_steps + 1} on (eval_steps > ramp_steps), or set load_best_model_at_end=False")

    def on_evaluate(self, args, state, control, **kwargs):
        # a backstop for what on_train_begin could not foresee (an evaluation called from another callback);
        # an evaluation outside train() picks no checkpoint
        if args.load_best_model_at_end and self.training and self.wrapped is not None:
            raise RuntimeError(self._best_model_refusal(state.global_step))

    def on_save(self, args, state, control, model=None, **kwargs):
        super().on_save(args, state, control, model=model, **kwargs)
        folder = checkpoint_folder(args, state)
        if args.should_save and folder.is_dir():
            write_json_atomic(folder / SWAP_FILE, self._swap_record())

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.wrapped is None:
            return
        values = alphas(self.schedule, state.global_step, self.ramp_steps, len(self.wrapped))
        if min(values, default=1.0) >= 1.0:  # fully swapped (or every norm rescaled): only the new norms
            unwrap_norms(extract_model_from_parallel(self._model), self.wrapped)
            self.wrapped = None
            return
        set_alphas(self.wrapped, values)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.training = False
        if self.wrapped is not None:  # training stopped inside the ramp (early stopping ...): finish the swap
            logger.warning("GradualSwapCallback: training ended inside the ramp (step %d of %d); the norms are "
                           "now swapped fully, so the model returned was never trained or evaluated as it is",
                           state.global_step, self.ramp_steps)
            unwrap_norms(extract_model_from_parallel(self._model), self.wrapped)
            self.wrapped = None
