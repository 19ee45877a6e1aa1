"""Loading a dataset with ``datasets`` (hub id or local files) and checking its columns.

Returns a ``DatasetDict`` with ``train`` and ``validation`` (and ``test`` when the
source has one). Everything that can be wrong with the data is reported here,
before a model is built or a file is written.
"""

from __future__ import annotations

from pathlib import Path

import datasets

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text"}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}


def _builder(files: list[Path]) -> str:
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"cannot load {[str(f) for f in files]}: use files of one kind among "
                         f"{sorted(BUILDERS)}")
    return kinds.pop()


def _local_data_files(path: Path) -> dict[str, list[str]]:
    """Split name -> files, for one file (all 'train') or a folder of train.*/validation.*/test.*."""
    if path.is_file():
        return {"train": [str(path)]}
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in BUILDERS)
    by_split = {split: [str(f) for f in files if f.stem.lower() in names]
                for split, names in SPLIT_NAMES.items()}
    by_split = {split: found for split, found in by_split.items() if found}
    if "train" in by_split:
        return by_split
    if files:  # e.g. a folder of novels: all of it is training text
        return {"train": [str(f) for f in files]}
    raise FileNotFoundError(f"no data file in {path}: expected train.* (and validation.*, test.*) "
                            f"or any file ending in {sorted(BUILDERS)}")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in BUILDERS


def load_raw_datasets(args, text_sample_by: str = "line") -> datasets.DatasetDict:
    """``args.dataset`` as a DatasetDict with train/validation[/test] splits.

    ``text_sample_by`` is how plain-text files are cut into examples ('line', 'paragraph',
    'document'). Without a validation split, ``args.validation_fraction`` of train is held out
    with the fixed ``args.split_seed``.
    """
    path = Path(args.dataset).expanduser()
    if path.exists():
        data_files = _local_data_files(path)
        builder = _builder([Path(f) for files in data_files.values() for f in files])
        kwargs = {"sample_by": text_sample_by} if builder == "text" else {}
        raw = datasets.load_dataset(builder, data_files=data_files, **kwargs)
    elif _looks_local(args.dataset):
        raise FileNotFoundError(f"dataset {args.dataset!r} does not exist: pass an existing csv/json/txt "
                                "file or folder, or a hub dataset id")
    else:
        try:
            raw = datasets.load_dataset(args.dataset, args.dataset_config)
        except Exception as err:  # datasets raises many types; all mean "cannot get it"
            raise ValueError(f"cannot load dataset {args.dataset!r} from the hub ({type(err).__name__}: "
                             f"{err}); check the id and your connection, or pass a local file or folder") from err
    if not isinstance(raw, datasets.DatasetDict) or "train" not in raw:
        raise ValueError(f"dataset {args.dataset!r} has no 'train' split (found {list(raw)})")
    raw = datasets.DatasetDict({_canonical(name): split for name, split in raw.items()})
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=args.validation_fraction, seed=args.split_seed)
        raw["train"], raw["validation"] = held_out["train"], held_out["test"]
    return _truncate(raw, args)


def _canonical(split: str) -> str:
    for name, aliases in SPLIT_NAMES.items():
        if split.lower() in aliases:
            return name
    return split


def _truncate(raw: datasets.DatasetDict, args) -> datasets.DatasetDict:
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_eval_samples}
    for split, limit in limits.items():
        if split in raw and limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw


def check_columns(raw: datasets.DatasetDict, required: list[str]) -> None:
    """Raise if a split lacks one of ``required``, naming the columns it does have."""
    for split, data in raw.items():
        missing = [c for c in required if c not in data.column_names]
        if missing:
            raise ValueError(f"split {split!r} has no column {missing}; its columns are {data.column_names} "
                             "(choose with --text_column / --label_column)")
