"""The sweep: one training run per (norm, seed), skipping runs that already finished.

A run has finished when its folder holds ``metrics.json`` (the training code writes it
last and atomically), so an interrupted sweep resumes by running the same command again.
Runs go one after another, either in this process or each through ``accelerate launch``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ..convert.fingerprint import data_fingerprint, model_fingerprint
from ..registry import available_norms
from ..training.args import BASELINE, MAX_SEED  # "layernorm": the unpatched model
from ..sources import check_apart
from ..training.checkpoints import METRICS_FILE, RESULTS_VERSION, RESUME_MAY_CHANGE, RUN_CONFIG_FILE, write_json_atomic
from ..training.locks import check_not_in_use, folder_lock

TEACHER_FINGERPRINT = "model_fingerprint"  # in sweep.json: convert/fingerprint.py
DATA_FINGERPRINT = "dataset_fingerprint"  # the local --dataset's files: the same split, the same labels
SWEEP_FILE = "sweep.json"  # the shared training options the finished runs were made with
SWEEP_OUTPUTS = ("runs", "report", SWEEP_FILE)  # what --overwrite_output_dir deletes (not the demo's data/)
LOCK_USER = "hf-adanorm compare"
WORKER_MODULE = "hf_adanorm.compare.worker"  # `python -m` entry point of one run

RunFn = Callable[[dict], object]  # trains one run from its options; writes metrics.json


def known_norms() -> list[str]:
    """What --norms accepts: the unpatched baseline and every registered norm."""
    return [BASELINE, *available_norms()]


def check_plan(norms, seeds) -> None:
    """Reject a bad sweep before anything runs."""
    if not norms:
        raise ValueError("no norms to compare; pass e.g. --norms layernorm adanorm")
    unknown = [n for n in norms if n not in known_norms()]
    if unknown:
        raise ValueError(f"unknown norm(s) {unknown}; choose from {known_norms()}")
    if len(set(norms)) != len(norms):
        raise ValueError(f"each norm once please, got {list(norms)}")
    if len(seeds) < 1:
        raise ValueError("need at least one seed; pass e.g. --seeds 0 1 2")
    if any(not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seeds must be non-negative integers up to 2**32 - 1 (numpy's range), got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"each seed once please (runs are paired by seed), got {list(seeds)}")


def check_training_options(setup: dict, norms) -> None:
    """Build each norm's TrainingArgs once, so a bad option fails before the first run starts."""
    from ..training import TrainingArgs

    for norm in norms:
        try:
            TrainingArgs(**dict(setup, norm=norm, seed=0, output_dir="unused"))
        except TypeError as err:  # an option TrainingArgs does not have
            known = sorted(f.name for f in fields(TrainingArgs))
            raise ValueError(f"{err}; training options are {known}") from None


def check_output_dir(output_dir) -> Path:
    """The sweep folder, refusing '' (which would be the current folder) and files."""
    if output_dir is None or not str(output_dir).strip():
        raise ValueError("the sweep folder is empty: pass --output-dir with a folder for the runs and the report")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder: pass another --output-dir")
    return output_dir


def run_dir(output_dir: Path, norm: str, seed: int | str) -> Path:
    return Path(output_dir) / "runs" / f"{norm}_seed{seed}"


def is_finished(folder: Path) -> bool:
    return (Path(folder) / METRICS_FILE).is_file()


def finished_runs(output_dir: Path, norm: str) -> list[Path]:
    """The folders of ``norm``'s finished runs in the sweep, every seed."""
    every_seed = run_dir(output_dir, norm, "*")  # a glob pattern in run_dir's own naming
    return sorted(p.parent for p in every_seed.parent.glob(f"{every_seed.name}/{METRICS_FILE}"))


def check_same_setup(output_dir: Path, setup: dict) -> None:
    """Refuse to mix finished runs made with other training options into one report."""
    path = Path(output_dir) / SWEEP_FILE
    if not path.is_file() or not any(run_dir(output_dir, "*", "*").parent.glob(f"*/{METRICS_FILE}")):
        return  # no finished run to mix with (a sweep whose first run failed on a bad option starts again)
    try:
        before = json.loads(path.read_text())
    except ValueError as err:  # cut off by an older hf_adanorm, killed while writing it (it is atomic now)
        raise ValueError(f"{path} is not readable JSON ({err}), so the finished runs there cannot be checked "
                         "against these options: start afresh with --overwrite_output_dir, or use a new "
                         "--output-dir") from None
    setup = json.loads(json.dumps(setup))  # as stored: tuples become lists, keys strings
    defaults = _training_defaults()  # an option given at its default is the option left out
    before, setup = ({k: v for k, v in {**defaults, **d}.items() if k not in RESUME_MAY_CHANGE}
                     for d in (before, setup))
    changed = sorted(k for k in set(before) | set(setup) if before.get(k) != setup.get(k))
    # (a sweep from before fingerprints were recorded has none to compare)
    changed = [k for k in changed if not (k in (TEACHER_FINGERPRINT, DATA_FINGERPRINT) and k not in before)
               and not (k == DATA_FINGERPRINT and k not in setup)]  # no data now: the demo writes it again
    if changed == [TEACHER_FINGERPRINT]:
        raise ValueError(f"{output_dir} holds runs made from another version of {setup.get('model')!r}: its config, "
                         "weight or tokenizer files have changed since. Pass --overwrite_output_dir to start the "
                         "sweep afresh, or use a new --output-dir")
    if changed == [DATA_FINGERPRINT]:
        raise ValueError(f"{output_dir} holds runs trained and tested on other data: the files of --dataset "
                         f"{setup.get('dataset')} have changed since. Pass --overwrite_output_dir to start the sweep "
                         "afresh, or use a new --output-dir")
    if changed:
        raise ValueError(
            f"{output_dir} holds runs made with other training options ("
            + "; ".join(f"{k}: {before.get(k)!r} then, {setup.get(k)!r} now" for k in changed) + "). "
            "Use a new --output-dir, or --overwrite_output_dir to start the sweep afresh.")


def _training_defaults() -> dict:
    """{option: its default} of every TrainingArgs option that has one, as sweep.json would store it."""
    from dataclasses import MISSING

    from ..training import TrainingArgs
    return json.loads(json.dumps({f.name: f.default if f.default is not MISSING else f.default_factory()
                                  for f in fields(TrainingArgs)
                                  if f.default is not MISSING or f.default_factory is not MISSING}))


def run_in_process(options: dict):
    """Train one run in this process with :func:`hf_adanorm.training.run_training`."""
    from ..training import TrainingArgs, run_training

    return run_training(TrainingArgs(**options))


def accelerate_command(options_file: str | Path, config_file: str | Path | None = None) -> list[str]:
    """The ``accelerate launch`` command line that trains the run described in ``options_file``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", str(config_file)]
    return cmd + ["-m", WORKER_MODULE, str(options_file)]


def accelerate_runner(config_file: str | Path | None = None) -> RunFn:
    """A run function that starts each run as its own ``accelerate launch`` job.

    The run's options go to ``<run folder>.options.json`` next to its folder (JSON keeps
    every value exactly, None included); ``config_file`` is an accelerate config, e.g. one
    of recipes/configs/, or None for accelerate's default config.
    """
    if config_file and not Path(config_file).is_file():
        raise FileNotFoundError(f"accelerate config {config_file} not found; write one with "
                                "`accelerate config --config_file PATH` or use a recipes/configs/ file")

    def run(options: dict):
        options_file = Path(f"{options['output_dir']}.options.json")
        options_file.parent.mkdir(parents=True, exist_ok=True)
        options_file.write_text(json.dumps(options, indent=2))
        cmd = accelerate_command(options_file, config_file)
        done = subprocess.run(cmd)
        if done.returncode != 0:
            raise RuntimeError(f"training run failed (exit code {done.returncode}): {shlex.join(cmd)}")

    return run


def load_run(folder: Path, norm: str, seed: int) -> dict:
    """A finished run as the report uses it: norm, seed, folder, final metrics, history."""
    path = Path(folder) / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except ValueError as err:  # (UnicodeDecodeError is one)
        metrics, why = None, f"not JSON: {err}"
    else:
        why = "no final metrics"
    if not isinstance(metrics, dict) or not isinstance(metrics.get("final"), dict):
        raise ValueError(f"{path} is not a finished run's metrics ({why}): delete the folder {folder} to train "
                         "that run again")
    run_config = Path(folder) / RUN_CONFIG_FILE
    launch = json.loads(run_config.read_text()) if run_config.is_file() else {}
    return dict(norm=norm, seed=seed, run_dir=str(folder), final=metrics["final"],
                history=metrics.get("history", []), config=metrics.get("config", {}),
                launch={k: launch[k] for k in (*LAUNCH_KEYS, "global_batch_size") if k in launch},
                results_version=metrics.get("results_version", 1))


def check_sweep(setup: dict, norms, seeds, output_dir, overwrite: bool = False,
                conversion: dict | None = None) -> Path:
    """Everything :func:`run_sweep` refuses, checked without writing anything; the sweep folder."""
    check_plan(norms, seeds)
    clash = {"norm", "seed", "output_dir", "overwrite_output_dir"} & set(setup)
    if clash:
        raise ValueError(f"{sorted(clash)} are set per run by the sweep; leave them out of the options")
    check_training_options(setup, norms)
    output_dir = check_output_dir(output_dir)
    # sweep.json and .lock go at the top (a --dataset folder would read them as data); runs/ and report/ are
    # written over, and deleted by --overwrite_output_dir, as are conversions/ converted again
    check_apart({k: setup.get(k) for k in ("model", "tokenizer", "dataset")},
                [(output_dir, False), *((output_dir / name, True) for name in (*OWN_FOLDERS, "conversions"))],
                "this sweep", "output-dir", output_dir)
    check_not_in_use(output_dir, LOCK_USER)
    if overwrite:
        check_only_sweep_files(output_dir)
    else:
        check_same_setup(output_dir, _recorded(setup, conversion))
    return output_dir


# What a sweep writes in its runs/ and report/ folders: --overwrite_output_dir deletes those folders only
# when they hold nothing else (a user's own runs/ or report/ beside other files is not a sweep's to delete).
OWN_FOLDERS = ("runs", "report")
_OWN_ENTRIES = {"runs": re.compile(r"[A-Za-z0-9_.-]+_seed\d+|\.lock(\.owner)?"),
                "report": re.compile(r"report\.md|runs\.csv|runs\.json|summary\.json|(curve|final|paired)_.+\.png"
                                     r"|\.tmp-.+")}


def check_only_sweep_files(output_dir: Path) -> None:
    """Refuse --overwrite_output_dir where runs/ or report/ hold entries a sweep does not write."""
    for name in OWN_FOLDERS:
        folder = Path(output_dir) / name
        if folder.is_symlink() or not folder.is_dir():
            continue  # a link is removed, never what it points to; a file is refused by name below
        foreign = sorted(p.name for p in folder.iterdir() if not _OWN_ENTRIES[name].fullmatch(p.name))
        if foreign:
            raise ValueError(f"--overwrite_output_dir would delete {folder}, which holds files a sweep does not "
                             f"write ({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}): move them, "
                             "or pass another --output-dir")
    for name in SWEEP_OUTPUTS:
        path = Path(output_dir) / name
        if name in OWN_FOLDERS and path.exists() and not path.is_symlink() and not path.is_dir():
            raise ValueError(f"--overwrite_output_dir: {path} is a file, not a sweep's folder: move it, or pass "
                             "another --output-dir")


def _recorded(setup: dict, conversion: dict | None) -> dict:
    """What sweep.json holds: the shared options, the conversion options under --convert, so that a
    sweep folder never mixes runs started from other conversions, and the fingerprints of the model and
    of a local dataset, so that it never mixes runs from two versions of either saved at one path."""
    recorded = setup if conversion is None else dict(setup, convert=conversion)
    fingerprints = {TEACHER_FINGERPRINT: model_fingerprint(setup["model"], setup.get("tokenizer"))
                    if isinstance(setup.get("model"), str) else None,
                    DATA_FINGERPRINT: data_fingerprint(setup.get("dataset"))}
    return dict(recorded, **{k: v for k, v in fingerprints.items() if v is not None})


def run_sweep(setup: dict, norms, seeds, output_dir, run_fn: RunFn | None = None,
              progress: bool = True, overwrite: bool = False, models: dict | None = None,
              conversion: dict | None = None) -> list[dict]:
    """Train every (norm, seed) not yet finished under ``output_dir``; return all runs loaded.

    ``setup`` holds the training options shared by every run (TrainingArgs fields, without
    norm, seed and output_dir).  ``run_fn(options)`` trains one run and must leave
    ``metrics.json`` in ``options["output_dir"]``; the default trains in this process.
    ``overwrite`` starts afresh: the runs, report and sweep.json already there are deleted
    first. The sweep folder is locked meanwhile: a second sweep there is refused.
    ``models`` maps a norm to the model its runs start from instead of ``setup["model"]`` (its
    converted model); ``conversion`` is recorded in sweep.json with the setup.
    """
    norms, seeds = list(norms), list(seeds)
    output_dir = check_sweep(setup, norms, seeds, output_dir, overwrite, conversion)
    with folder_lock(output_dir, LOCK_USER):
        if overwrite:
            check_only_sweep_files(output_dir)  # again, now that no other sweep can write there
            for name in SWEEP_OUTPUTS:
                path = output_dir / name
                # a link goes, never what it points to
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        recorded = _recorded(setup, conversion)
        check_same_setup(output_dir, recorded)  # again, now that no other sweep can write there
        write_json_atomic(output_dir / SWEEP_FILE, recorded)  # a kill leaves the old file or the new one
        return _run_all(setup, norms, seeds, output_dir, run_fn or run_in_process, progress, models or {})


def _run_all(setup: dict, norms: list, seeds: list, output_dir: Path, run_fn: RunFn, progress: bool,
             models: dict) -> list[dict]:
    plan = [(norm, seed, run_dir(output_dir, norm, seed)) for seed in seeds for norm in norms]
    todo = [p for p in plan if not is_finished(p[2])]
    if len(todo) < len(plan):
        tqdm.write(f"hf-adanorm compare: {len(plan) - len(todo)} of {len(plan)} runs already "
                   f"finished in {output_dir}; running the other {len(todo)}")
    done = [load_run(folder, norm, seed) for norm, seed, folder in plan if is_finished(folder)]
    # the first run to train would be made by this version: refused before it trains, not after
    check_runs_alike([*done, *({"norm": n, "seed": s, "results_version": RESULTS_VERSION} for n, s, _ in todo[:1])])
    bar = tqdm(todo, desc="runs", unit="run", disable=not progress)
    for norm, seed, folder in bar:
        bar.set_postfix_str(f"{norm} seed {seed}")
        # an unfinished run's leftovers (model/ written, killed before metrics.json) are replaced
        options = dict(setup, norm=norm, seed=seed, output_dir=str(folder), overwrite_output_dir=True)
        if models and norm in models:
            options["model"] = models[norm]
        if options.get("checkpointing_steps") and not options.get("resume_from_checkpoint"):
            options["resume_from_checkpoint"] = "latest"  # a run cut off mid-way continues there
        try:
            run_fn(options)
        except Exception:
            tqdm.write(f"hf-adanorm compare: the run {norm} seed {seed} failed; finished runs are "
                       "kept, so the same command resumes once the cause is fixed")
            raise
        if not is_finished(folder):
            raise RuntimeError(f"the run {norm} seed {seed} returned without writing "
                               f"{folder / METRICS_FILE}; the sweep cannot report it")
        done.append(load_run(folder, norm, seed))
        check_runs_alike(done)  # at once: not after the rest of the sweep has run the other way too
    runs = [load_run(folder, norm, seed) for norm, seed, folder in plan]
    check_runs_alike(runs)
    return runs


# What a run's run_config.json records of how it was launched, beyond its options: runs of one report
# must share it (2 processes double the global batch; mixed precision changes the numbers).
LAUNCH_KEYS = ("world_size", "distributed_type", "mixed_precision")


def check_runs_alike(runs: list[dict]) -> None:
    """Refuse to report runs launched differently: another launcher or accelerate config in a rerun of
    the sweep (the options, which sweep.json compares, can be the same); or made by versions of
    hf_adanorm that compute or score a run differently (``RESULTS_VERSION``)."""
    versions: dict[int, list[str]] = {}
    for r in runs:
        versions.setdefault(r.get("results_version", 1), []).append(f"{r['norm']} seed {r['seed']}")
    if len(versions) > 1:
        described = "; ".join(f"version {v}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                              for v, names in sorted(versions.items()))
        raise ValueError(f"the runs of this sweep were made by versions of hf_adanorm that compute or score a run "
                         f"differently ({described}; this one makes version {RESULTS_VERSION}), so they cannot be "
                         "paired in one report: start the sweep afresh with --overwrite_output_dir, or use a new "
                         "--output-dir")
    _check_options_alike(runs)
    kinds: dict[tuple, list[str]] = {}
    for r in runs:
        if r.get("launch"):
            kinds.setdefault(tuple(r["launch"].get(k) for k in LAUNCH_KEYS), []).append(f"{r['norm']} seed {r['seed']}")
    if len(kinds) > 1:
        described = "; ".join(f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: "
                              + ", ".join(f"{k}={v}" for k, v in zip(LAUNCH_KEYS, kind)) for kind, names in kinds.items())
        raise ValueError(f"the runs of this sweep were launched differently ({described}), so they cannot be paired "
                         "in one report: rerun with the launcher and accelerate config of the first runs, or start "
                         "afresh with --overwrite_output_dir")


# What may differ between the recorded options of two runs of one sweep: the run itself, where and what it
# saves, and the model (a converted arm starts from its own; runs of one norm must share theirs).
_PER_RUN = {"norm", "seed", "model", *RESUME_MAY_CHANGE}


def _check_options_alike(runs: list[dict]) -> None:
    """Refuse runs whose own recorded options (metrics.json's config) differ: sweep.json guards the sweep's
    options, but a sweep folder whose sweep.json was lost, or with run folders copied in from elsewhere, has
    only these; they also hold the defaults each run was made under."""
    defaults = _training_defaults()
    recorded = [dict(r, config={**defaults, **r["config"]}) for r in runs if r.get("config")]
    first_of_norm: dict[str, dict] = {}
    for run in recorded:
        first, same_norm = recorded[0], first_of_norm.setdefault(run["norm"], run)
        differ = [(first, k) for k in sorted((set(first["config"]) | set(run["config"])) - _PER_RUN)
                  if first["config"].get(k) != run["config"].get(k)]
        if same_norm["config"].get("model") != run["config"].get("model"):
            differ.append((same_norm, "model"))
        if differ:
            described = "; ".join(f"{k}: {other['config'].get(k)!r} in {other['norm']} seed {other['seed']}, "
                                  f"{run['config'].get(k)!r} in {run['norm']} seed {run['seed']}" for other, k in differ)
            raise ValueError(f"the runs of this sweep were made with other options ({described}), so they cannot "
                             "be paired in one report: start the sweep afresh with --overwrite_output_dir, or use "
                             "a new --output-dir")
