"""Loading a dataset with ``datasets`` (hub id or local files) and checking its columns.

Returns a ``DatasetDict`` with ``train`` and ``validation`` (and ``test`` when the
source has one). Everything that can be wrong with the data is reported here,
before a model is built or a file is written, naming the file (and where it can, the row
and the column) and what was expected, rather than as a traceback from inside ``datasets``.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow.compute as pc

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text"}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}


def _builder(files: list[Path]) -> str:
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"cannot load {[str(f) for f in files]}: use files of one kind among "
                         f"{sorted(BUILDERS)}")
    return kinds.pop()


def local_data_files(path: Path) -> dict[str, list[str]]:
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


def load_raw_datasets(args, text_sample_by: str = "line", columns=(), label_column=None) -> datasets.DatasetDict:
    """``args.dataset`` as a DatasetDict with train/validation[/test] splits.

    ``text_sample_by`` is how plain-text files are cut into examples ('line', 'paragraph',
    'document'). Without a validation split, ``args.validation_fraction`` of train is held out
    with the fixed ``args.split_seed``. Every split must have ``columns`` with no empty cell
    (an unlabelled test split, every ``label_column`` cell empty, is allowed).
    """
    path = Path(args.dataset).expanduser()
    where = {}  # split -> how to name it in an error
    if path.exists():
        data_files = local_data_files(path)
        builder = _builder([Path(f) for files in data_files.values() for f in files])
        kwargs = {"sample_by": text_sample_by} if builder == "text" else {}
        try:
            raw = datasets.load_dataset(builder, data_files=data_files, **kwargs)
        except Exception as err:  # datasets wraps the reader's error (pandas, json, UnicodeDecodeError)
            raise ValueError(_explain_unreadable(data_files, builder, err)) from err
        where = {split: _describe_files(files, builder) for split, files in data_files.items()}
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
    where = {_canonical(split): text for split, text in where.items()}
    if columns:
        check_columns(raw, list(columns))
        check_no_empty_cells(raw, list(columns), label_column,
                             {split: where.get(split, f"split {split!r} of {args.dataset!r}") for split in raw})
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


def _describe_files(files: list[str], builder: str) -> tuple[str, str]:
    """(how to name a split's source, what one of its rows is called) for error messages."""
    row = {"csv": "row {row} below the header", "json": "record {row}", "text": "example {row}"}[builder]
    if len(files) == 1:
        return files[0], row
    return f"the concatenation of {files}", row


def check_no_empty_cells(raw: datasets.DatasetDict, columns: list[str], label_column, where: dict) -> None:
    """Refuse empty (null / NaN) cells in ``columns``: they would fail deep inside the tokenizer
    or the label mapping. The row counts from 1 in the split's file(s), as loaded."""
    for split, data in raw.items():
        for column in columns:
            cells = data.data.column(column)
            missing = pc.is_null(cells, nan_is_null=True)
            count = pc.sum(missing).as_py() or 0
            if not count or (split == "test" and column == label_column and count == len(data)):
                continue  # an unlabelled test split is dropped later
            first = pc.index(missing, True).as_py()
            source, row = where[split] if isinstance(where[split], tuple) else (where[split], "row {row}")
            what = "a label" if column == label_column else "text"
            raise ValueError(f"{source}: {row.format(row=first + 1)} has an empty {column!r} cell ({count} of "
                             f"{len(data)} rows do). Every example needs {what} in column {column!r}: fill in or "
                             "remove those rows")


def _first_undecodable_line(path: Path):
    """(line number, byte offset in it) of the first line that is not UTF-8, or None."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return number, err.start
    return None


def _explain_unreadable(data_files: dict, builder: str, err: Exception) -> str:
    """Say which file could not be read and why, in the user's terms."""
    expected = {"csv": "a header line naming the columns (e.g. text,label), then one example per line",
                "json": "one JSON object per line (or a JSON list of objects)",
                "text": "UTF-8 text"}[builder]
    for split, files in data_files.items():
        for name in files:
            path = Path(name)
            with open(path, "rb") as f:
                content = f.read(1 << 16)  # enough to tell an empty file or a lone header
            if not content.strip():
                return f"{path} ({split} split) is empty: expected {expected}"
            bad = _first_undecodable_line(path)
            if bad:
                return (f"{path} ({split} split), line {bad[0]}, byte {bad[1] + 1} of that line, is not UTF-8 text: "
                        f"save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
            lines = [line for line in content.decode("utf-8", "ignore").splitlines() if line.strip()]
            if builder == "csv" and len(lines) == 1:
                return f"{path} ({split} split) has a header ({lines[0][:80]!r}) but no rows: expected {expected}"
    cause = err.__cause__ or err.__context__ or err
    return (f"cannot read {[f for files in data_files.values() for f in files]} as {builder} "
            f"({type(cause).__name__}: {cause}); expected {expected}")
