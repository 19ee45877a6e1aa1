"""Convert a pretrained model to another norm without losing what it learned.

    >>> from hf_adanorm.convert import ConvertArgs, convert_model
    >>> result = convert_model(ConvertArgs(model="...", norm="adanorm", dataset="texts/",
    ...                                    output_dir="outputs/convert"))

The steps (``hf_adanorm/convert/loop.py``): load the model twice, as the frozen teacher and
as the student; ``patch_model`` the student with every exact fold applied; wrap each new norm
in a :class:`~hf_adanorm.convert.schedule.BlendedNorm` that starts as the original; then
distil the teacher into the student on unlabeled text while the schedule moves every blend
to the new norm. ``output_dir/model`` is the converted model (``hf_adanorm.save_pretrained``),
``conversion.json`` / ``conversion.md`` / ``drift.png`` the drift before and after.
"""

from .args import ConvertArgs, parse_args


def convert_model(args: ConvertArgs) -> dict:
    """Run a conversion; returns what is written to ``output_dir/conversion.json``."""
    from .loop import convert_model as run  # accelerate and datasets load on first use
    return run(args)


__all__ = ["ConvertArgs", "convert_model", "parse_args"]
