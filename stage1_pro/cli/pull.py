"""Download a published bundle, verify schemas and checksums, and write it atomically.

URI forms: gs://BUCKET/PREFIX (follows PREFIX/latest), gs://BUCKET/PREFIX/latest, or
gs://BUCKET/PREFIX/VERSION. An unfinished publish (no bundle.json), a file not listed in
bundle.json, or a checksum mismatch is refused and DIR is not created.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", metavar="gs://BUCKET/PREFIX[/VERSION|/latest]", help="what to pull")
    parser.add_argument("dest", metavar="DIR", help="local folder to create (new or empty)")


def run(args: argparse.Namespace) -> int:
    from stage1_pro.bundle import bundle_summary, verify_bundle
    from stage1_pro.registry import pull

    dest = pull(args.uri, args.dest)
    print(f"{dest}: {bundle_summary(verify_bundle(dest))}")
    return 0
