"""hf_adanorm.save_pretrained called on every rank of a sharded model, for tests/test_sharded_save.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/sharded_save_driver.py MODE OUT

MODE is "fsdp2" (torch's ``fully_shard`` on a gloo CPU mesh) or "zero3" (``deepspeed.initialize``
with ZeRO stage 3 on DeepSpeed's CPU accelerator, over gloo). Every rank builds the same patched
tiny GPT-2; rank 0 first saves it unsharded into OUT/reference. Then the model is sharded, and
every rank calls ``hf_adanorm.save_pretrained(model, OUT/sharded)`` (the DeepSpeed engine itself
for ZeRO-3); a second call with a bad argument on rank 1 only must fail on both ranks, not hang.
Each rank writes OUT/rank{i}.json: what the call returned and how much of the model it held.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_adanorm  # noqa: E402
from test_fold import tiny_lm  # noqa: E402


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if mode == "zero3":
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "adanorm", fold_affine=True)
    total = sum(p.numel() for p in model.parameters())
    if rank == 0:
        hf_adanorm.save_pretrained(model, out / "reference")
    dist.barrier()
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        target = model
        local = sum(p.to_local().numel() for p in model.parameters())
    else:
        import deepspeed
        target, *_ = deepspeed.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
            "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True})
        local = sum(p.ds_tensor.numel() for p in model.parameters())
    returned = hf_adanorm.save_pretrained(target, out / "sharded", metrics={"ranks": dist.get_world_size()})
    try:  # rank 1 alone passes a bad argument: every rank must raise instead of waiting in the gather
        hf_adanorm.save_pretrained(target, out / "never", metrics="acc=1" if rank == 1 else None)
        refused = None
    except Exception as err:  # noqa: BLE001 - reported to the test
        refused = f"{type(err).__name__}: {err}"
    (out / f"rank{rank}.json").write_text(json.dumps({
        "returned": None if returned is None else str(returned), "refused": refused,
        "local_elements": local, "total_elements": total, "class": type(model).__name__}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
