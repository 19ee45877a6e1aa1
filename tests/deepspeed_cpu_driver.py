"""One training run through accelerate's DeepSpeed path on CPU processes, for tests/test_recipes.py.

    accelerate launch --config_file recipes/configs/deepspeed_zero2.yaml --mixed_precision no \
        --gradient_accumulation_steps 2 --gradient_clipping 0.5 tests/deepspeed_cpu_driver.py ARGS_JSON DUMP_DIR

DeepSpeed itself runs on CPU (its CPU accelerator, over gloo), but accelerate 1.x finds no
backend for a machine without a GPU: every rank would see itself as the only process (and
cpu=True turns DeepSpeed off). This driver names gloo as that backend; all that follows
(deepspeed.initialize, ZeRO's partitioned optimizer, the recipe's loop and save) is unchanged.
Every rank writes rank{i}.json: what it saw of the process group and of the DeepSpeed config
(so the test sees that the command-line overrides beat the config file).
"""

import json
import os
import sys
from pathlib import Path

from accelerate.state import PartialState

from hf_adanorm.training import TrainingArgs, task_module, train

_accelerate_backend = PartialState._prepare_backend


def gloo_when_no_device(self, *args, **kwargs):
    backend, distributed_type = _accelerate_backend(self, *args, **kwargs)
    if backend is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        backend = "gloo"
    return backend, distributed_type


def main():
    PartialState._prepare_backend = gloo_when_no_device
    args = TrainingArgs(**json.loads(Path(sys.argv[1]).read_text()))
    result = train(args, task_module(args.task).build_task)
    plugin = result.accelerator.state.deepspeed_plugin
    dump = Path(sys.argv[2])
    dump.mkdir(parents=True, exist_ok=True)
    (dump / f"rank{result.accelerator.process_index}.json").write_text(json.dumps({
        "world_size": result.accelerator.num_processes,
        "distributed_type": str(result.accelerator.distributed_type),
        "zero_stage": plugin.zero_stage,
        "gradient_accumulation_steps": plugin.deepspeed_config["gradient_accumulation_steps"],
        "gradient_clipping": plugin.deepspeed_config["gradient_clipping"]}))


if __name__ == "__main__":
    main()
