"""The `ectune` command line. Training commands take a preset plus any config field as a flag
(`--train.batch 64`, `--objective.q 4`, ...; generated from ectune.config by tyro)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Sequence

from .. import __version__

# Command -> the module of this package that runs it (its `run(command, argv)`), imported only when it runs, so
# `ectune info` does not pay for the training loop or the feature extractors.
COMMANDS = {
    "demo": "demo",
    "pretrain": "train",
    "tune": "train",
    "sample": "sample",
    "info": "info",
    "convert-images": "convert_images",
    "eval": "eval",
    "ref-stats": "ref_stats",
    "import-edm": "import_edm",
    "encode-latents": "encode_latents",
    "export": "export",
    "push": "push",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\ncommands: " + ", ".join(COMMANDS) + "\nrun `ectune COMMAND --help` for its options")
        return 0
    if argv[0] == "--version":
        print(f"ectune {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"ectune: unknown command {command!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from ..runtime import distributed as rt_dist
    from ..training.signals import EXIT_INTERRUPTED, TrainingInterrupted

    owns_process_group = not rt_dist.is_initialized()  # under torchrun the command itself joins the group
    try:
        module = importlib.import_module(f"{__name__}.{COMMANDS[command]}")
        code = module.run(command, rest) or 0
        if owns_process_group and code == 0:
            rt_dist.shutdown()  # on success only: after a failure the other ranks may never arrive
        return code
    except TrainingInterrupted as exc:  # saved on --runtime.save-on-signal; every rank stopped at the same step
        if owns_process_group:
            rt_dist.shutdown()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ectune {command}: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("ectune: interrupted; rerun the same command to resume from the last save", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:  # our errors carry one clear sentence
        print(f"ectune {command}: error: {exc}", file=sys.stderr)
        return 1
