"""One training run through accelerate's FSDP path on CPU processes, for tests/test_recipes.py.

    accelerate launch --config_file recipes/configs/fsdp.yaml --mixed_precision no \
        --fsdp_transformer_layer_cls_to_wrap BertLayer tests/fsdp_cpu_driver.py ARGS_JSON DUMP_DIR

accelerate 1.x never selects FSDP on CPU: with cpu=True its AcceleratorState makes the gloo
group MULTI_CPU (DDP) and drops the FSDP plugin the launcher configured. torch's FSDP2 runs on
gloo, so this driver promotes the state to FSDP right after accelerate built it; all that follows
(prepare -> fully_shard, clipping, get_state_dict, the recipe's final save) is accelerate's and the
project's own FSDP code. Every rank writes rank{i}.json: what it saw of the process group and of
the FSDP plugin, and how many parameter elements it holds (its shard) out of the model's total.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from hf_adanorm.training import TrainingArgs, task_module, train

_accelerate_init = AcceleratorState.__init__


def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = fsdp_plugin
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        # MULTI_CPU's device is cpu:0, which torch's FSDP does not take for the CPU
        self.device = PartialState._shared_state["device"] = torch.device("cpu")


def main():
    AcceleratorState.__init__ = init_with_fsdp_on_cpu
    args = TrainingArgs(**json.loads(Path(sys.argv[1]).read_text()))
    result = train(args, task_module(args.task).build_task)
    parameters = list(result.model.parameters())
    dump = Path(sys.argv[2])
    dump.mkdir(parents=True, exist_ok=True)
    (dump / f"rank{result.accelerator.process_index}.json").write_text(json.dumps({
        "world_size": result.accelerator.num_processes,
        "distributed_type": str(result.accelerator.distributed_type),
        "fsdp_version": result.accelerator.state.fsdp_plugin.fsdp_version,
        "wrapped": result.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap,
        "local_elements": sum(p.to_local().numel() for p in parameters),
        "total_elements": sum(p.numel() for p in parameters)}))


if __name__ == "__main__":
    main()
