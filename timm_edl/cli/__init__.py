"""The ``timm-edl`` command: one entry point, one sub-command per job.

Each sub-command is a module exposing ``main(argv) -> int``: ``train``, ``eval``, ``certify``, ``export``,
``push`` and ``convert`` live in this package (their libraries below it), ``demo`` beside
it.  All of them share one grammar (:mod:`.args`: ``KEY=VALUE`` options and the model option group) and
one exit-status rule (:mod:`.errors`: 0 done, 1 a failure while running, 2 a usage error, 75 stopped
unfinished with its progress saved, 130 interrupted).
Modules are imported only when their sub-command runs, so ``timm-edl --help`` stays fast.
"""
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "train": ("timm_edl.cli.train", "adversarial training / fine-tuning (accelerate)"),
    "eval": ("timm_edl.cli.eval", "RobustBench-style evaluation (clean, PGD, AutoAttack)"),
    "certify": ("timm_edl.cli.certify", "certified L2 robustness by randomized smoothing (Cohen et al.)"),
    "export": ("timm_edl.cli.export", "write a Hub-ready folder (safetensors, config.json, card)"),
    "push": ("timm_edl.cli.push", "upload an exported folder to the Hugging Face Hub"),
    "convert": ("timm_edl.cli.convert", "turn the convolutions of a timm CNN into EDL layers"),
    "demo": ("timm_edl.demo", "train, evaluate and export an EDLNet and its conv twin on real data (minutes, CPU)"),
}


def _usage() -> str:
    lines = ["usage: timm-edl <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'timm-edl <command> --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from .errors import fail
        return fail(None, f"unknown command {name!r}.\n\n{_usage()}")
    from ..runtime import keep_freed_memory
    keep_freed_memory()  # our own process: reuse freed activation buffers (see timm_edl/runtime.py)
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, "main")
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
