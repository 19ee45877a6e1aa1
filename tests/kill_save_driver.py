"""Kill ``hf_adanorm.save_pretrained`` at many points while it replaces a checkpoint, for
tests/test_atomic_save.py.

    python tests/kill_save_driver.py WORKDIR N_UNIFORM

The folder WORKDIR/ckpt holds checkpoint A (AdaNorm, remote code) plus a foreign file (a
tokenizer); each trial restores it, forks, and the child saves checkpoint B (LayerNorm-simple,
no remote code) over it with a profiler that SIGKILLs the child at its k-th profiler event:
N_UNIFORM points spread over the whole save, plus every call and return of the functions that
touch the disk. The parent then compares the folder, byte for byte, with a clean save of A and
of B. Writes WORKDIR/result.json: the number of events, and per trial (k, what was found).
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_adanorm  # noqa: E402
from test_fold import tiny_lm  # noqa: E402

DISK = {"rename", "replace", "link", "fsync", "rmtree", "_swap", "_sync_tree", "_link_tree", "write_text",
        "save_file", "unlink", "copytree", "mkdir", "save", "open", "renameat2", "save_pretrained"}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def profiler(kill_at=None, counts=None):
    seen = [0, 0]  # all events, disk events

    def on_event(frame, event, arg):
        seen[0] += 1
        name = arg.__name__ if event == "c_call" else frame.f_code.co_name
        disk = event in ("call", "return", "c_call") and name in DISK
        if disk:
            seen[1] += 1
        if kill_at is not None and ((kill_at[0] == "all" and seen[0] == kill_at[1])
                                    or (kill_at[0] == "disk" and disk and seen[1] == kill_at[1])):
            os.kill(os.getpid(), signal.SIGKILL)
        if counts is not None:
            counts[:] = seen
    return on_event


def main():
    work, n_uniform = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    model_a = tiny_lm("gpt2")
    hf_adanorm.patch_model(model_a, "adanorm", fold_affine=True)
    torch.manual_seed(1)
    model_b = tiny_lm("gpt2")
    hf_adanorm.patch_model(model_b, "layernorm_simple")

    def save_b(target):
        hf_adanorm.save_pretrained(model_b, target, remote_code=False, metrics={"step": 2})

    old = work / "old"
    hf_adanorm.save_pretrained(model_a, old, metrics={"step": 1})
    (old / "tokenizer.json").write_text('{"foreign": "kept by every save"}')
    new = work / "new"
    shutil.copytree(old, new)
    save_b(new)
    expected = {"old": snapshot(old), "new": snapshot(new)}
    assert expected["old"] != expected["new"]

    target = work / "ckpt"
    counts = [0, 0]

    def restore():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(old, target)

    restore()
    sys.setprofile(profiler(counts=counts))
    save_b(target)
    sys.setprofile(None)
    total, disk_events = counts
    points = [("all", 1 + (total - 1) * i // max(n_uniform - 1, 1)) for i in range(n_uniform)]
    points += [("disk", k) for k in range(1, disk_events + 1)]
    trials = []
    for kind, k in points:
        restore()
        pid = os.fork()
        if pid == 0:
            sys.setprofile(profiler(kill_at=(kind, k)))
            try:
                save_b(target)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        found = snapshot(target) if target.is_dir() else None
        state = next((name for name, files in expected.items() if files == found), "BROKEN")
        if state == "BROKEN":
            state += f": {sorted(found) if found is not None else 'no folder'}"
        trials.append({"kind": kind, "k": k, "killed": killed, "found": state})
    leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith(".ckpt"))
    restore()
    save_b(target)  # a clean save clears what the killed ones left
    (work / "result.json").write_text(json.dumps({
        "total_events": total, "disk_events": disk_events, "trials": trials, "leftovers_after_kills": leftovers,
        "leftovers_after_clean_save": sorted(p.name for p in work.iterdir() if p.name.startswith(".ckpt")),
        "clean_save": "new" if snapshot(target) == expected["new"] else "BROKEN"}))


if __name__ == "__main__":
    main()
