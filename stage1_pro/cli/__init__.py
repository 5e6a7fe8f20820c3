"""The ``stage1-pro`` console script: one verb per step of the pipeline.

Verbs are registered in :data:`COMMANDS` by module path and imported only when used, so
``stage1-pro --help`` lists them without importing torch, timm or kfp. Each verb module
defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from stage1_pro import __version__


@dataclass(frozen=True)
class Command:
    """A CLI verb: the module implementing it and a one-line summary."""

    module: str
    summary: str


#: verb -> implementation module and the one-line summary ``stage1-pro --help`` lists.
COMMANDS: dict[str, Command] = {
    "demo-data": Command(
        "stage1_pro.cli.demo_data", "write the embedded MNIST dataset as PNG files + manifest"
    ),
    "split": Command("stage1_pro.cli.split", "deterministic, stratified, group-aware split -> splits.json"),
    "prepare": Command("stage1_pro.cli.prepare", "decode images once into training-resolution shards"),
    "train": Command("stage1_pro.cli.train", "train one phase -> model_best.pth, metrics.csv, scores.npz"),
    "calibrate": Command("stage1_pro.cli.calibrate", "certify an exit policy on scores.npz -> policy file"),
    "validate": Command(
        "stage1_pro.cli.validate", "audit the policy on test, bless or not -> validation.json"
    ),
    "export": Command("stage1_pro.cli.export", "export a validated run as a deployable bundle folder"),
    "predict": Command("stage1_pro.cli.predict", "exit-positive / exit-negative / defer per image"),
    "drift": Command(
        "stage1_pro.cli.drift", "are new images still like val_calib? label-free check (exit 3: drift)"
    ),
    "publish": Command("stage1_pro.cli.publish", "upload a bundle to gs://.../<version>/, move latest"),
    "pull": Command("stage1_pro.cli.pull", "download a published bundle, verified, into a folder"),
    "versions": Command("stage1_pro.cli.versions", "list a registry's versions and which one 'latest' is"),
    "rollback": Command("stage1_pro.cli.rollback", "point PREFIX/latest at a published version, verified"),
    "check": Command("stage1_pro.cli.check", "validate any artifact against its JSON Schema"),
    "compile": Command("stage1_pro.cli.compile", "compile the Kubeflow pipeline to YAML"),
    "doctor": Command(
        "stage1_pro.cli.doctor", "check a live cluster before a run: KFP version, GPU pool, quota, bucket"
    ),
    "upload": Command("stage1_pro.cli.upload", "upload the pipeline to Kubeflow (then new versions)"),
    "run": Command("stage1_pro.cli.run", "start a pipeline run on Kubeflow with --param key=value"),
    "schedule": Command("stage1_pro.cli.schedule", "recurring retraining (6-field cron), replacing NAME"),
    "run-local": Command("stage1_pro.cli.run_local", "run the whole pipeline locally (kfp.local) -> bundle"),
}

_PROG = "stage1-pro"


def _overview() -> str:
    width = max(len(v) for v in COMMANDS)
    lines = [
        f"usage: {_PROG} [--version] [-v] VERB [options]",
        "",
        "Train, certify and ship the stage-1 exit classifier of a cascade: stage 1 answers only",
        "where its certified policy keeps FNR_exit <= target_fnr_exit with probability >= 1 - delta.",
        "",
        "verbs:",
        *(f"  {verb.ljust(width)}  {cmd.summary}" for verb, cmd in COMMANDS.items()),
        "",
        f"Run '{_PROG} VERB --help' for the options of a verb.",
    ]
    return "\n".join(lines)


def _unknown_verb(verb: str) -> int:
    close = difflib.get_close_matches(verb, COMMANDS, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    print(f"{_PROG}: unknown verb {verb!r}.{hint} Verbs: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


def build_parser(verb: str) -> tuple[argparse.ArgumentParser, object]:
    """Return the argument parser of ``verb`` and its implementing module."""
    cmd = COMMANDS[verb]
    module = importlib.import_module(cmd.module)
    parser = argparse.ArgumentParser(
        prog=f"{_PROG} {verb}",
        description=(module.__doc__ or cmd.summary).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    return parser, module


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from stage1_pro.errors import Stage1ProError

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0
    if args[0] == "--version":
        print(f"{_PROG} {__version__}")
        return 0
    verb, rest = args[0], args[1:]
    if verb not in COMMANDS:
        return _unknown_verb(verb)
    parser, module = build_parser(verb)
    ns = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(module.run(ns) or 0)
    except Stage1ProError as exc:
        print(f"{_PROG} {verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{_PROG} {verb}: interrupted", file=sys.stderr)
        return 130


def run_verb(*verb_args: str) -> NoReturn:
    """Run ``stage1-pro VERB_ARGS... <this process's arguments>`` and exit with its status.

    The one body of every ``stage1_pro/scripts/*.py`` wrapper: a script is a verb (and for the
    calibrate scripts, its policy) with the same flags and behaviour.

    Args:
        verb_args: the verb and any arguments the script fixes, e.g. ``"calibrate", "--policy", "gate"``.
    """
    sys.exit(main([*verb_args, *sys.argv[1:]]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
