"""Publish a bundle folder to a registry prefix: PREFIX/<version>/, then move PREFIX/latest.

Every file is uploaded first and bundle.json last, so an interrupted publish leaves a version
that pull refuses; the 'latest' pointer (a small JSON object) moves only after the whole
version is uploaded. Published versions are immutable. Transient GCS errors are retried.

With --expect-latest VERSION (the champion the bundle was validated against; '' for "nothing
published yet"), 'latest' moves only if it still names VERSION, checked inside the same
compare-and-swap that moves it. If another publisher moved it meanwhile, the version stays
published but 'latest' is left alone and the command exits 2, naming both versions and the fix.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE_DIR", help="local bundle folder (from 'stage1-pro export')")
    parser.add_argument(
        "prefix", metavar="gs://BUCKET/PREFIX", help="registry prefix (a local folder also works)"
    )
    parser.add_argument(
        "--no-latest", "--no_latest", action="store_true", help="do not move PREFIX/latest (default: move it)"
    )
    parser.add_argument(
        "--expect-latest",
        "--expect_latest",
        metavar="VERSION",
        default=None,
        help=(
            "move PREFIX/latest only if it still names VERSION, the champion this bundle was validated "
            "against ('': only if nothing is published yet); otherwise the version is published, latest "
            "is left alone and the exit status is 2 (default: move latest whatever it names)"
        ),
    )
    parser.add_argument(
        "--allow-unblessed",
        "--allow_unblessed",
        action="store_true",
        help="publish a bundle marked blessed: false (latest is never moved to it)",
    )


def run(args: argparse.Namespace) -> int:
    from stage1_pro.registry import publish

    uri = publish(
        args.bundle,
        args.prefix,
        set_latest=not args.no_latest,
        allow_unblessed=args.allow_unblessed,
        expect_latest=args.expect_latest,
    )
    print(uri)
    return 0
