"""Crash-safe checkpoints and JSON outputs.

A checkpoint is written by ``accelerator.save_state`` (model, optimizer,
scheduler, every rank's RNG states) into ``checkpoints/.tmp-step_N``, then the
loop's own state is added as ``training_state.json``, and only then is the
folder renamed to ``checkpoints/step_N``. A rename is atomic, so a process killed
at any point leaves either a complete ``step_N`` or a ``.tmp-`` folder that
:func:`latest_checkpoint` ignores and the next run deletes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

METRICS_FILE = "metrics.json"  # written last and atomically: its presence means the run finished
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "training_state.json"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"step_(\d+)")


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


def save_checkpoint(accelerator, output_dir, step: int, loop_state: dict, total_limit: Optional[int]) -> Path:
    """Save everything needed to resume after optimizer step ``step``; all ranks must call it."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final, tmp = root / f"step_{step}", root / f"{TMP_PREFIX}step_{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its part (its RNG state at least)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, loop_state)
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
    return json.loads((path / STATE_FILE).read_text())
