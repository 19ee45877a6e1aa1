"""One training run in its own process(es), for tests/test_recipes.py.

    python tests/recipe_driver.py ARGS_JSON DUMP_DIR [KILL_AT]
    accelerate launch --config_file recipes/configs/cpu_2proc.yaml tests/recipe_driver.py ARGS_JSON DUMP_DIR

Trains with ``hf_adanorm.training.train`` and has every rank write the final weights it
holds (``rank{i}.safetensors``) and what it saw of the process group (``rank{i}.json``).
With KILL_AT = N the process SIGKILLs itself while writing its N-th checkpoint: after
``accelerator.save_state`` wrote the files, before the checkpoint is committed.
"""

import json
import os
import signal
import sys
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import save_file

from hf_adanorm.training import TrainingArgs, task_module, train


def kill_during_checkpoint(n: int) -> None:
    original, calls = Accelerator.save_state, []

    def save_state_then_die(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Accelerator.save_state = save_state_then_die


def main():
    args = TrainingArgs(**json.loads(Path(sys.argv[1]).read_text()))
    dump = Path(sys.argv[2])
    if len(sys.argv) > 3:
        kill_during_checkpoint(int(sys.argv[3]))
    result = train(args, task_module(args.task).build_task)
    rank = result.accelerator.process_index
    dump.mkdir(parents=True, exist_ok=True)
    weights = {name: p.detach().contiguous() for name, p in result.model.state_dict().items()}
    save_file(weights, str(dump / f"rank{rank}.safetensors"))
    (dump / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": result.accelerator.num_processes,
        "distributed_type": str(result.accelerator.distributed_type)}))


if __name__ == "__main__":
    main()
