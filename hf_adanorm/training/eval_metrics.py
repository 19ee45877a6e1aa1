"""Further classification metrics from the ``evaluate`` library (``--eval_metrics``).

The built-in metrics (accuracy, macro-F1) come from scikit-learn and need no network;
``evaluate`` adds every metric of its hub (Matthews correlation for CoLA, ...) and the user's
own metric scripts. Hub metrics are fetched on first use (then cached), so offline only a
local path, or a metric fetched before, loads. Each metric is loaded when the task is built,
before a file is written, so a wrong name fails there and not after the first epoch.
"""

from __future__ import annotations

import numbers

import numpy as np


def load_eval_metrics(names: list[str]) -> dict:
    """{name: evaluate module}, each loaded (in memory: several ranks compute them at once)."""
    if not names:
        return {}
    import evaluate

    loaded = {}
    for name in names:
        try:
            loaded[name] = evaluate.load(name, keep_in_memory=True)
        except Exception as err:  # evaluate raises FileNotFoundError, ImportError, ConnectionError ...
            raise ValueError(f"cannot load the evaluate metric {name!r} ({type(err).__name__}: {err}); pass the "
                             "path of a local metric script (or its folder), or a hub metric name while online "
                             "(it is cached afterwards)") from err
    return loaded


def compute_eval_metrics(modules: dict, labels: np.ndarray, predictions: np.ndarray, taken) -> dict:
    """Every number the metrics return for these predictions; a key already in ``taken`` (or
    from an earlier metric) becomes ``<metric name>_<key>``. Non-numbers (per-class arrays) are left out."""
    out = {}
    for name, module in modules.items():
        result = module.compute(predictions=predictions.tolist(), references=labels.tolist())
        for key, value in (result or {}).items():
            if isinstance(value, np.generic):
                value = value.item()
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                continue
            if key in taken or key in out:
                key = f"{module.name}_{key}"
            out[key] = float(value)
    return out
