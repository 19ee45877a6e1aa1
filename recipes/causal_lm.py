"""Train a causal LM from scratch (as in the paper) or fine-tune one, with any norm.

    # character-level GPT-2 from a config on the Austen novels, loss / perplexity / bits per character
    python recipes/causal_lm.py --model config:gpt2 --tokenizer char \
        --model_config '{"n_layer": 4, "n_embd": 128, "n_head": 4}' \
        --dataset ../shared/data/austen --max_length 128 --norm adanorm
    # a pretrained model on a hub dataset, on all GPUs
    accelerate launch --config_file recipes/configs/multi_gpu.yaml recipes/causal_lm.py \
        --model gpt2 --dataset wikitext --dataset_config wikitext-2-raw-v1 --norm layernorm_simple

`python recipes/causal_lm.py --help` lists every option (hf_adanorm.training.TrainingArgs).
The loop itself is hf_adanorm/training/loop.py; the task pieces are hf_adanorm/training/causal_lm.py.
"""

from transformers import HfArgumentParser

from hf_adanorm.training import TrainingArgs
from hf_adanorm.training.causal_lm import build_task
from hf_adanorm.training.loop import train


def training_function(args: TrainingArgs) -> dict:
    # build_task: load the text (datasets), tokenize it and cut it into blocks of max_length,
    # build or load the AutoModelForCausalLM and swap its norms -- before accelerator.prepare().
    # train: the Accelerate loop (see hf_adanorm/training/loop.py).
    result = train(args, build_task)
    result.accelerator.print(f"final: {result.metrics['final']}  (written to {args.output_dir}/metrics.json)")
    return result.metrics


def main():
    parser = HfArgumentParser(TrainingArgs)
    parser.set_defaults(task="causal_lm")
    try:
        (args,) = parser.parse_args_into_dataclasses()
    except ValueError as err:  # TrainingArgs checks every option as it is built
        parser.error(str(err))
    training_function(args)


if __name__ == "__main__":
    main()
