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

import sys

from hf_adanorm.training import run_recipe

# training_function(args) (hf_adanorm/training/causal_lm.py): load the text with datasets,
# tokenize it and cut it into blocks of max_length, build or load the AutoModelForCausalLM and
# swap its norms -- all before accelerator.prepare() -- then run the Accelerate loop of
# hf_adanorm/training/loop.py; returns what it writes to output_dir/metrics.json.


def main() -> int:
    return run_recipe("causal_lm")  # parse_args (--help lists every option), then training_function


if __name__ == "__main__":
    sys.exit(main())
