"""One sweep run as its own process: ``accelerate launch -m hf_adanorm.compare.worker OPTIONS.json``.

The sweep hands each run its TrainingArgs as a JSON file rather than as flags: JSON keeps
every value exactly, including ``None`` (e.g. ``max_grad_norm=None``, no clipping), which
a command-line flag cannot express.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> None:
    from ..training import TrainingArgs, run_training

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m hf_adanorm.compare.worker OPTIONS.json")
    run_training(TrainingArgs(**json.loads(Path(argv[0]).read_text())))


if __name__ == "__main__":
    main()
