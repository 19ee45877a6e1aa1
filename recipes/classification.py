"""Fine-tune a sequence classifier with LayerNorm (baseline), LayerNorm-simple, AdaNorm ...

The same script runs everywhere; only the launcher changes:

    python recipes/classification.py --model <hub id or folder> --dataset rotten_tomatoes --norm adanorm
    accelerate launch --config_file recipes/configs/multi_gpu.yaml recipes/classification.py ...   # DDP
    accelerate launch --config_file recipes/configs/fsdp.yaml recipes/classification.py ...        # FSDP
    accelerate launch --config_file recipes/configs/deepspeed_zero2.yaml recipes/classification.py ...
    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/classification.py --cpu ...

`python recipes/classification.py --help` lists every option (hf_adanorm.training.TrainingArgs).
The loop itself is hf_adanorm/training/loop.py; the task pieces (data, model, metrics) are
hf_adanorm/training/classification.py.
"""

from transformers import HfArgumentParser

from hf_adanorm.training import TrainingArgs
from hf_adanorm.training.classification import build_task
from hf_adanorm.training.loop import train


def training_function(args: TrainingArgs) -> dict:
    # build_task: load the dataset (datasets), check its columns, tokenize, load the
    # AutoModelForSequenceClassification and swap its norms (patch_model) -- all before
    # accelerator.prepare(), so every error surfaces before training starts.
    # train: Accelerator + prepare, accumulate/backward/step, evaluation each epoch with
    # gather_for_metrics, save_state checkpoints, metrics.json and the final model/.
    result = train(args, build_task)
    result.accelerator.print(f"final: {result.metrics['final']}  (written to {args.output_dir}/metrics.json)")
    return result.metrics


def main():
    parser = HfArgumentParser(TrainingArgs)
    parser.set_defaults(task="classification")
    try:
        (args,) = parser.parse_args_into_dataclasses()
    except ValueError as err:  # TrainingArgs checks every option as it is built
        parser.error(str(err))
    training_function(args)


if __name__ == "__main__":
    main()
