"""Where a ``--model`` or ``--tokenizer`` is: a local folder, or a hub id.

Checked when the options are read, before anything is loaded or written. Left to transformers, a path
that does not exist reads as a malformed repo id, and an uncached hub id offline as a failed
connection, both reported from the tokenizer, which is loaded first.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id


def expand_home(value):
    """``~/m`` as the shell would have expanded it (a quoted value, a JSON option, a Python call).
    A hub id never starts with ``~``, so nothing else is changed."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def check_model_source(option: str, value: str) -> None:
    """Refuse a ``--option`` that names nothing this machine can load: a path that does not exist, or,
    with ``HF_HUB_OFFLINE`` set, a hub id whose files are not in the local cache. A hub id online is left
    to the download, whose own error is clear."""
    if Path(value).exists():
        return
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise FileNotFoundError(f"--{option} {value}: no such file or folder (nor a hub id): pass an "
                                "existing folder or a hub id") from None
    if constants.HF_HUB_OFFLINE:
        try:
            snapshot_download(value, local_files_only=True)
        except Exception:  # not cached (huggingface_hub raises several types for it)
            raise FileNotFoundError(
                f"--{option} {value}: no such local folder, and the hub id {value!r} is not in the local "
                "cache (HF_HUB_OFFLINE is set, so nothing is downloaded): pass a local folder, or download "
                "it once with a network connection") from None


def check_apart(inputs: dict, written: list, command: str, output_option: str, output_dir) -> None:
    """Refuse a local input (``{option: value}``) that is, or lies inside, what ``command`` writes or deletes:
    ``written`` holds ``(folder, whole)`` pairs, ``whole`` when everything inside the folder is written over
    (a saved model, checkpoints, a sweep's runs) and not only files at its top (run_config.json, sweep.json,
    which a data folder would then read as data). Paths are compared resolved, links followed, as the writes
    follow them; a hub id's files are its cached snapshot. (An output folder *inside* an input folder is
    harmless: neither text nor models are read recursively.)"""
    from .convert.fingerprint import model_folder

    for option, value in inputs.items():
        if not (isinstance(value, str) and value):
            continue
        path = (Path(value) if Path(value).exists()
                else model_folder(value) if option in ("model", "tokenizer") else None)
        if path is None:
            continue
        path = path.resolve()
        for folder, whole in written:
            folder = Path(folder).resolve()
            if path == folder or (whole and folder in path.parents):
                raise ValueError(f"the --{option} {value} is {'' if path == folder else 'inside '}{folder}, which "
                                 f"{command} writes (--{output_option} {output_dir}): it would write over its own "
                                 f"input; pass an --{output_option} elsewhere")
