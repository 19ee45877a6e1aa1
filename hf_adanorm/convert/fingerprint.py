"""What identifies a teacher beyond its name: a hash of its config, weights and tokenizer.

A conversion is resumed, and ``compare --convert`` reuses a finished one, by its options, and
``--model`` is a path or a hub id. A model saved again at the same path (fine-tuned further, or
replaced) would otherwise resume a student distilled from the old teacher under the new one, or
start a sweep's arms from the old model while its baseline fine-tunes the new one. Checkpoints and
conversion.json record this fingerprint, and both refuse a teacher whose files changed (for a hub
id: the files of the cached snapshot, so a newer revision counts as a change). The same weights
saved again in other shards count as a change too: a refusal is the safe side of a doubt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

# The files that decide the function: the config, the weights as transformers saves them (shards and
# their index) and the tokenizer's files (other token ids are other inputs). Not every *.bin or *.pt: a
# Trainer checkpoint folder also holds optimizer.pt and training_args.bin, which only cost reading.
WEIGHT_FILES = re.compile(r"(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
                          r"(\.index\.json)?")
TOKENIZER_FILES = re.compile(r"tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)"
                             r"|merges\.txt|.*\.model|.*\.tiktoken")
CHUNK = 1 << 24


def _config_bytes(path: Path) -> bytes:
    """config.json without the version of transformers that wrote it (saving the same model with
    another version changes nothing else)."""
    config = json.loads(path.read_text())
    config.pop("transformers_version", None)
    return json.dumps(config, sort_keys=True).encode()


def model_folder(model: str) -> Path | None:
    """The folder of a local model, or of a hub model's cached snapshot (its files for the revision the
    cache holds now); None when neither is on disk."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not a hub id, or not cached: nothing on disk
        return None


def _identity_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name == "config.json" or WEIGHT_FILES.fullmatch(p.name) or TOKENIZER_FILES.fullmatch(p.name)))


@functools.lru_cache(maxsize=8)
def _digest(files: tuple, model_files: bool = True) -> str:
    """sha256 of ``files`` ((path, size, mtime_ns) each: a file written again is read again)."""
    digest = hashlib.sha256()
    for name, _, _ in files:
        path = Path(name)
        digest.update(path.name.encode() + b"\0")
        if model_files and path.name == "config.json":
            digest.update(_config_bytes(path))
        else:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def model_fingerprint(model: str, tokenizer: str | None = None) -> str | None:
    """sha256 of a model's config (less its transformers version), weight and tokenizer files (names
    and bytes), and of ``tokenizer``'s files when it is another folder; None when the model's files
    are not on disk. Reads every weight byte once (about 1 s per GB; again only if a file changed)."""
    folders = [model_folder(model)]
    if folders[0] is None:
        return None
    if tokenizer is not None and model_folder(tokenizer) not in (None, folders[0]):
        folders.append(model_folder(tokenizer))
    files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for folder in folders
                  for p in _identity_files(folder))
    return _digest(files)


def files_fingerprint(paths) -> str:
    """sha256 of the names and bytes of ``paths`` (data files, say), in the order given."""
    return _digest(tuple((str(p), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths),
                   model_files=False)


def data_fingerprint(dataset) -> str | None:
    """The fingerprint of the files a local ``--dataset`` is read from (not of other files beside them);
    None for a hub dataset, or a path that holds no data (the run then says why)."""
    from ..training.data import local_data_files

    if not (isinstance(dataset, str) and Path(dataset).exists()):
        return None
    try:
        by_split = local_data_files(Path(dataset))
    except FileNotFoundError:
        return None
    return files_fingerprint([f for split in sorted(by_split) for f in by_split[split]])


def check_same_data(recorded: str | None, current: str | None, dataset: str, what: str, remedy: str,
                    use: str = "train on") -> None:
    """Refuse when ``what`` was made from other files of ``dataset`` than those there now."""
    if recorded is not None and current is not None and recorded != current:
        raise ValueError(f"{what} was made from other data: the files of {dataset} have changed since, so going "
                         f"on would {use} data its first part did not see; {remedy}")


def check_same_teacher(recorded: str | None, current: str | None, model: str, what: str, remedy: str) -> None:
    """Refuse when ``what`` was made from other files of ``model`` than those there now."""
    if recorded is not None and current is not None and recorded != current:
        raise ValueError(f"{what} was made from another version of {model}: its config or weight files have "
                         f"changed since; {remedy}")
