"""Crash-safe checkpoints and JSON outputs.

A checkpoint is written by ``accelerator.save_state`` (model, optimizer,
scheduler, every rank's RNG states) into ``checkpoints/.tmp-step_N``, then the
loop's own state is added as ``training_state.json``, and only then is the
folder renamed to ``checkpoints/step_N``. A rename is atomic, so a process killed
at any point leaves either a complete ``step_N`` or a ``.tmp-`` folder that
:func:`latest_checkpoint` ignores and the next run deletes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

RUN_CONFIG_FILE = "run_config.json"  # the run's options and setup, written when it (re)starts
METRICS_FILE = "metrics.json"  # written last and atomically: its presence means the run finished
# In metrics.json. Raise it whenever a run with the same options would compute or score differently, so that
# hf-adanorm compare never pairs runs made both ways. 1 (unrecorded): before macro-F1 was averaged over the
# split's classes and a built tokenizer put [EOS] between a pair's texts.
RESULTS_VERSION = 2
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "training_state.json"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"step_(\d+)")
# Options that may change on resume: where things go and what is kept, nothing the training sees.
RESUME_MAY_CHANGE = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir", "checkpointing_steps",
                     "checkpoints_total_limit", "save_model")


def write_json_atomic(path, data) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: readers see the
    old file or the whole new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(output_dir) -> Optional[Path]:
    """The complete checkpoint with the most steps in ``output_dir``, or None."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def remove_incomplete(output_dir) -> None:
    """Delete what a killed checkpoint write left behind (main process only)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p)


def run_record(args, num_processes: int, mixed_precision: Optional[str] = None,
               distributed_type: Optional[str] = None, data_fingerprint: Optional[str] = None) -> dict:
    """What a checkpoint records of its run, for :func:`check_resume` (JSON values). ``mixed_precision`` and
    ``distributed_type`` are the accelerator's own (a launcher's config sets them where no option does);
    ``data_fingerprint`` that of the local files the run reads (convert/fingerprint.py)."""
    record = {"args": args.to_dict(), "world_size": num_processes}
    if data_fingerprint is not None:
        record["data_fingerprint"] = data_fingerprint
    if mixed_precision is not None:
        record["mixed_precision"] = mixed_precision
    if distributed_type is not None:
        record["distributed_type"] = distributed_type
    return json.loads(json.dumps(record))


def launch_differences(recorded: dict, num_processes: int, mixed_precision: Optional[str] = None,
                       distributed_type: Optional[str] = None) -> list[str]:
    """How this launch differs from the one a checkpoint's ``recorded`` run names (what it does not record
    goes unchecked): the number of processes deals the batches, the mixed precision computes them, and
    the distributed type (DDP, FSDP, DeepSpeed) decides the format of the saved model and optimizer."""
    differences = []
    if recorded.get("world_size") not in (None, num_processes):
        differences.append(f"world_size={recorded['world_size']} processes (now {num_processes})")
    if mixed_precision is not None and recorded.get("mixed_precision") not in (None, mixed_precision):
        differences.append(f"mixed_precision={recorded['mixed_precision']!r}, from its launcher "
                           f"(now {mixed_precision!r})")
    if distributed_type is not None and recorded.get("distributed_type") not in (None, distributed_type):
        differences.append(f"distributed_type={recorded['distributed_type']!r}, from its launcher "
                           f"(now {distributed_type!r})")
    return differences


def save_checkpoint(accelerator, output_dir, step: int, loop_state: dict, total_limit: Optional[int],
                    run: Optional[dict] = None) -> Path:
    """Save everything needed to resume after optimizer step ``step``; all ranks must call it.
    ``run`` (see :func:`run_record`) goes into the checkpoint, so that a resume can be checked."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final, tmp = root / f"step_{step}", root / f"{TMP_PREFIX}step_{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its part (its RNG state at least)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, {**loop_state, "run": run} if run else loop_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point
        if total_limit:
            complete = sorted((int(_NAME.fullmatch(p.name).group(1)), p) for p in root.iterdir()
                              if _NAME.fullmatch(p.name))
            for _, old in complete[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(args) -> Optional[Path]:
    """The checkpoint ``args.resume_from_checkpoint`` names (checked before training starts)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        return latest_checkpoint(args.output_dir)
    path = Path(args.resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pass a "
                                f"{CHECKPOINT_DIR}/step_N folder or 'latest'")
    return path


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model/optimizer/scheduler/RNG states from ``path``; returns the loop state."""
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    state.pop("run", None)
    return state


def _recorded_run(path: Path) -> Optional[dict]:
    """The checkpoint's own record, else (older checkpoints) its run folder's run_config.json."""
    state = json.loads((path / STATE_FILE).read_text())
    if "run" in state:
        return state["run"]
    run_config = path.parent.parent / RUN_CONFIG_FILE
    if run_config.is_file():
        config = json.loads(run_config.read_text())
        return {"args": config.get("args", {}), "world_size": config.get("world_size")}
    return None


def _defaults(args) -> dict:
    """The default of every option of ``args`` (a dataclass), as JSON values."""
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(args)}
    return json.loads(json.dumps(defaults))


def check_resume(path: Path, args, num_processes: int, mixed_precision: Optional[str] = None,
                 distributed_type: Optional[str] = None, data_fingerprint: Optional[str] = None) -> None:
    """Refuse a resume that would not continue the checkpoint's run exactly: other options (each
    difference named), another launch (:func:`launch_differences`), or a missing or corrupt random state."""
    start_afresh = ("Resume with the run's own options, or start afresh with --overwrite_output_dir "
                    "(or another --output_dir)")
    recorded = _recorded_run(path)
    if recorded is None:
        raise ValueError(f"cannot check that resuming {path} is exact: it records no options and there is no "
                         f"{RUN_CONFIG_FILE} beside its checkpoints. {start_afresh}")
    now = run_record(args, num_processes)
    # an option a checkpoint does not record (newer than it) had its default then
    before = {**_defaults(args), **recorded["args"]}
    differences = [f"{name}={before.get(name)!r} (now {value!r})" for name, value in now["args"].items()
                   if name not in RESUME_MAY_CHANGE and before.get(name) != value]
    differences += launch_differences(recorded, num_processes, mixed_precision, distributed_type)
    if differences:
        raise ValueError(f"cannot resume {path} exactly: its run was trained with {', '.join(differences)}. "
                         f"{start_afresh}")
    from ..convert.fingerprint import check_same_data
    check_same_data(recorded.get("data_fingerprint"), data_fingerprint, args.dataset, f"the checkpoint {path}",
                    start_afresh)
    check_random_states(path, num_processes)


def check_random_states(path: Path, num_processes: int) -> None:
    """Refuse a checkpoint whose saved random state of some rank is missing or unreadable: its run would
    go on with other dropout masks and another data order than the uninterrupted one."""
    from accelerate.utils import load as accelerate_load  # what accelerator.load_state reads them with
    from accelerate.utils.constants import RNG_STATE_NAME

    for rank in range(num_processes):
        states = path / f"{RNG_STATE_NAME}_{rank}.pkl"
        try:
            loaded = accelerate_load(states)
            missing = [key for key in ("random_state", "numpy_random_seed", "torch_manual_seed") if key not in loaded]
        except Exception as err:  # torch.load raises many types on a damaged pickle
            missing = [f"a readable file ({type(err).__name__}: {err})"]
        if missing:
            raise ValueError(f"cannot resume {path} exactly: the random state {states.name} lacks "
                             f"{', '.join(missing)}, so dropout and data order would differ from the "
                             f"uninterrupted run. Resume from an earlier checkpoint, or start afresh with "
                             "--overwrite_output_dir")
