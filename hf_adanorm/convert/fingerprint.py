"""What identifies a local teacher beyond its path: a hash of its weights and config.

A conversion is resumed, and ``compare --convert`` reuses a finished one, by its options, and a local
``--model`` is a path. A model saved again at the same path (fine-tuned further, or replaced) would
otherwise resume a student distilled from the old teacher under the new one, or start a sweep's
arms from the old model while its baseline fine-tunes the new one. Checkpoints and conversion.json
record this fingerprint, and both refuse a teacher whose files changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# The files that decide the function: the config and every weight file (shards and their index).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
CHUNK = 1 << 24


def model_fingerprint(model: str) -> str | None:
    """sha256 of a local model folder's config and weight files (names and bytes); None for a hub id,
    whose files the hub's cache already keeps by revision. Reads every weight byte once: about 1 s per
    GB."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def check_same_teacher(recorded: str | None, current: str | None, model: str, what: str, remedy: str) -> None:
    """Refuse when ``what`` was made from other files of ``model`` than those there now."""
    if recorded is not None and current is not None and recorded != current:
        raise ValueError(f"{what} was made from another version of {model}: its config or weight files have "
                         f"changed since; {remedy}")
