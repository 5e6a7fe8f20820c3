"""Point PREFIX/latest at an already published version (roll back, or promote), verified and atomic.

The version is downloaded and verified first (every sha256 and schema, as 'pull' does) and must be
blessed; then 'latest' is replaced in one conditional write on the generation read at the start:
if another publisher or operator moved 'latest' meanwhile, nothing is changed and the command
fails (exit 2) saying so. The move is recorded in the pointer's history ('versions --history').
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prefix", metavar="gs://BUCKET/PREFIX", help="registry prefix (a local folder also works)"
    )
    parser.add_argument(
        "--to", required=True, metavar="VERSION", help="the published version 'latest' should name"
    )


def run(args: argparse.Namespace) -> int:
    from stage1_pro.registry import LATEST, read_latest, rollback

    before = read_latest(args.prefix)
    pointer = rollback(args.prefix, args.to)
    previous = before["version"] if before else None
    if previous == args.to:
        print(f"{args.prefix}/{LATEST} already points at {args.to}; nothing changed")
    else:
        print(f"{args.prefix}/{LATEST}: {previous or '(unset)'} -> {pointer['version']} (verified, blessed)")
    return 0
