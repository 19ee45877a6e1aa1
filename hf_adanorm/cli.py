"""Command line: ``hf-adanorm inspect``, ``convert`` and ``compare`` (and ``python -m hf_adanorm``)."""

from __future__ import annotations

import argparse
import sys

from .compare.command import add_compare_parser
from .convert.command import add_convert_parser
from .registry import available_norms


def _load_model(model_name: str | None, arch: str):
    import torch
    from transformers import AutoConfig, AutoModel

    if model_name:
        from .sources import check_model_source, expand_home
        model_name = expand_home(model_name)
        check_model_source("model", model_name)  # a missing folder is named as one, not as a bad repo id
        return AutoModel.from_pretrained(model_name)
    torch.manual_seed(0)
    try:
        config = AutoConfig.for_model(arch, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128)
    except Exception as err:  # an unknown type, or one whose config takes no hidden_size (SegFormer)
        raise ValueError(f"cannot build a tiny {arch!r} (hidden size 64, 2 layers, 4 heads): "
                         f"{type(err).__name__}: {err}; pass --model with a model of it") from None
    return AutoModel.from_config(config)


def inspect(args) -> int:
    """Show what patch_model would do, do it, and check that unpatch_model undoes it."""
    import torch

    from .fold_trace import primary_output, probe_inputs, relative_drift
    from .patch import patch_model, unpatch_model

    try:
        model = _load_model(args.model, args.arch).eval()
        print(patch_model(model, args.norm, include_rmsnorm=args.include_rmsnorm, dry_run=True))
    except (OSError, ValueError) as err:  # unloadable model, nothing to patch
        print(f"hf-adanorm inspect: {err}", file=sys.stderr)
        return 2
    unchecked = "so the patched output and the unpatch were not checked"
    try:
        inputs = probe_inputs(model)  # token ids (and decoder ids), or images
    except ValueError:  # audio models
        print(f"hf-adanorm inspect: the list above stands, but no random batch is built for {type(model).__name__}'s "
              f"main input {getattr(model, 'main_input_name', None)!r} (only token ids and images), {unchecked}",
              file=sys.stderr)
        return 2
    try:
        with torch.no_grad():
            before = primary_output(model(**inputs))
    except (TypeError, AttributeError, RuntimeError, ValueError) as err:  # it needs more inputs (CLIP)
        print(f"hf-adanorm inspect: the list above stands, but {type(model).__name__} cannot run a random batch of "
              f"{', '.join(sorted(inputs))} alone ({type(err).__name__}: {err}), {unchecked}", file=sys.stderr)
        return 2
    with torch.no_grad():
        patch_model(model, args.norm, include_rmsnorm=args.include_rmsnorm)
        patched = primary_output(model(**inputs))
        unpatch_model(model)
        after = primary_output(model(**inputs))
    print(f"relative change of the output when patched: {relative_drift(patched, before):.3f}")
    print(f"unpatch restores the output bitwise: {torch.equal(before, after)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-adanorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="dry-run patch_model on a model and verify unpatch")
    p.add_argument("--model", help="hub id or local folder (default: a tiny random model)")
    p.add_argument("--arch", default="bert", help="architecture of the tiny default model")
    p.add_argument("--norm", default="adanorm", choices=available_norms())
    p.add_argument("--include-rmsnorm", "--include_rmsnorm", dest="include_rmsnorm", action="store_true",
                   help="also swap RMSNorms (Llama, T5 ...)")
    p.set_defaults(func=inspect)
    add_convert_parser(sub)
    add_compare_parser(sub)
    return parser


# What a Ctrl-C leaves, per command, and how to go on (a traceback said none of it).
INTERRUPTED = {
    "compare": "Finished runs are kept (and each run's checkpoints, with --checkpointing_steps): the same "
               "command resumes the sweep.",
    "convert": "Its last checkpoint is kept (every --checkpointing_steps): the same command continues it "
               "exactly.",
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\nhf-adanorm {args.command}: interrupted. {INTERRUPTED.get(args.command, '')}".rstrip(),
              file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it


if __name__ == "__main__":
    sys.exit(main())
