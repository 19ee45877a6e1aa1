"""The ``hf-adanorm convert`` subcommand (also ``accelerate launch -m hf_adanorm convert ...``)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Convert a pretrained model to LayerNorm-simple, AdaNorm, a DetachNorm or no norm while keeping
its function: the model with the new norms (the student) is distilled from the original (the
teacher) on unlabeled text while each norm is blended from the original into the new one.
Writes OUTPUT_DIR/model (load it with hf_adanorm.from_pretrained, or give it to the recipes
and `hf-adanorm compare` as --model), conversion.json, conversion.md, convert_args.json (the
options, which a resume checks) and, when there was training, drift.png.
An interrupted conversion resumes from its last checkpoint when rerun."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default, as the recipes' --help shows them (not
    None: those options' help says what they default to, the model's tokenizer or a norm's own value)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    from ..training.args import options_parser

    from .args import ConvertArgs

    options = options_parser(ConvertArgs, add_help=False)
    p = subparsers.add_parser("convert", parents=[options], help="convert a pretrained model to another norm",
                              description=DESCRIPTION, formatter_class=_HelpFormatter)
    p.set_defaults(func=run_convert)
    return p


def run_convert(namespace) -> int:
    from dataclasses import fields

    from .args import ConvertArgs

    values = {f.name: getattr(namespace, f.name) for f in fields(ConvertArgs)}
    try:
        args = ConvertArgs(**values)
    except (ValueError, OSError) as err:  # an option out of range, a --model that is nowhere
        print(f"hf-adanorm convert: error: {err}", file=sys.stderr)
        return 2
    from . import convert_model
    from .report import REPORT_FILE
    try:
        convert_model(args)
    except (ValueError, OSError) as err:  # bad model, text or folder: the message says which
        print(f"hf-adanorm convert: error: {err}", file=sys.stderr)
        return 2
    from pathlib import Path
    print((Path(args.output_dir) / REPORT_FILE).read_text())
    return 0
