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

import sys

from hf_adanorm.training import run_recipe

# training_function(args) (hf_adanorm/training/classification.py): load the dataset with
# datasets, check its columns, tokenize, load the AutoModelForSequenceClassification and swap its
# norms (patch_model) -- all before accelerator.prepare(), so every error surfaces before training
# starts -- then run the Accelerate loop of hf_adanorm/training/loop.py: prepare,
# accumulate/backward/step, evaluation each epoch with gather_for_metrics, save_state checkpoints,
# metrics.json and the final model/.


def main() -> int:
    return run_recipe("classification")  # parse_args (--help lists every option), then training_function


if __name__ == "__main__":
    sys.exit(main())
