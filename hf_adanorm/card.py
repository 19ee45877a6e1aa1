"""The model card (``README.md``) of a checkpoint written by ``hf_adanorm.save_pretrained``."""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from .portable import BUILTIN_NORMS, MODEL_TYPE_PREFIX

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub_id(model) -> Optional[str]:
    """The hub id the model was loaded from, if it was one (a local path is not)."""
    name = getattr(model.config, "_name_or_path", "") or ""
    return name if _HUB_ID.match(name) and not os.path.exists(name) else None


def _auto_class(auto_map: dict, cls: str) -> str:
    """The Auto class to show: one that builds ``cls``, a task class (AutoModelFor...) before the
    bare AutoModel.

    Only Auto classes read ``auto_map``; ``GPT2LMHeadModel.from_pretrained(path,
    trust_remote_code=True)`` ignores it (and refuses the checkpoint's guarded config).
    """
    builds = [name for name, target in auto_map.items() if target.endswith(f".{cls}") and name != "AutoConfig"]
    return min(builds, key=lambda name: (not name.startswith("AutoModelFor"), name))


def model_card(model, record: Optional[dict], *, base_model: Optional[str] = None,
               metrics: Optional[dict] = None, auto_map: Optional[dict] = None) -> ModelCard:
    """A card with base_model, library_name, tags, how to load, the patch record and metrics.

    ``record`` is None for a plain (stock) checkpoint; ``auto_map`` is what config.json's
    ``auto_map`` holds when the remote code is saved (None without it).
    """
    if metrics is not None and not (isinstance(metrics, dict) and all(isinstance(k, str) for k in metrics)):
        raise TypeError(f"metrics must be a dict of name -> value, e.g. {{'eval_loss': 2.1}}; got {metrics!r}")
    if base_model is not None and not isinstance(base_model, str):
        raise TypeError(f"base_model must be a hub id such as 'openai-community/gpt2', got {base_model!r}")
    norm = record["config"]["norm"] if record else "layernorm_simple"
    tags = ["hf-adanorm", norm.replace("_", "-")] + (["custom_code"] if auto_map else [])
    base_model = base_model or _hub_id(model)
    data = ModelCardData(base_model=base_model, library_name="transformers", tags=tags)
    cls = type(model).__name__
    if record is None:
        load = (f"This is a stock `{cls}` checkpoint: each LayerNorm-simple is stored as an "
                "ordinary norm with gain 1 and bias 0, so transformers alone loads it:\n\n"
                f"```python\nfrom transformers import {cls}\nmodel = {cls}.from_pretrained(path)\n```")
    else:
        custom = norm not in BUILTIN_NORMS
        load = ("Load it with hf_adanorm"
                + (f" after registering the norm `{norm}` exactly as it was when saving "
                   f"(`hf_adanorm.register_norm({norm!r}, ...)`; this norm was added with `register_norm`, "
                   "so the checkpoint carries no definition of it and `trust_remote_code` loading refuses it)"
                   if custom else "")
                + (", or with transformers alone through the remote code `modeling_hf_adanorm.py`"
                   if auto_map and not custom else "")
                + ":\n\n```python\nimport hf_adanorm, transformers\n"
                + f"model = hf_adanorm.from_pretrained(transformers.{cls}, path)\n"
                + (f"model = transformers.{_auto_class(auto_map, cls)}.from_pretrained(path, "
                   "trust_remote_code=True)  # via auto_map\n" if auto_map and not custom else "")
                + "tokenizer = hf_adanorm.load_tokenizer(path)  # if one was saved here; no remote-code prompt\n"
                + "```\n\n"
                + f"Its config.json has the model_type `{MODEL_TYPE_PREFIX}...` and stock transformers classes "
                "refuse it (a stock class would build the model without its norms).")
    parts = [f"# {cls} with {norm}",
             f"`{base_model or 'A pretrained model'}` with its LayerNorms replaced by **{norm}** "
             "([Xu et al., 2019](https://arxiv.org/abs/1911.07013)) using "
             "`hf_adanorm`.", load]
    if metrics:
        rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                         for k, v in metrics.items())
        parts.append(f"## Metrics\n\n| metric | value |\n|---|---|\n{rows}")
    if record is not None:
        parts.append("## Patch record\n\nAlso in `config.json` under `hf_adanorm`:\n\n"
                     f"```json\n{json.dumps(record, indent=2, sort_keys=True)}\n```")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n")
