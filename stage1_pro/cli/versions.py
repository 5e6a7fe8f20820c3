"""List the versions published under a registry prefix, newest last, and which one 'latest' is.

One row per version folder: version, created, blessed, policy, test coverage, certified FNR_exit
bound, data fingerprint; '*' marks the version PREFIX/latest points at. A folder without
bundle.json (an unfinished or failed publish) is listed as incomplete; pull and rollback refuse
it. With --history, also the moves of 'latest' (publishes and rollbacks), newest first.
"""

from __future__ import annotations

import argparse

#: Characters of the data fingerprint shown in the table (--json prints it whole).
FINGERPRINT_CHARS = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prefix", metavar="gs://BUCKET/PREFIX", help="registry prefix (a local folder also works)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--history", action="store_true", help="also print the moves of 'latest'")


def _fmt(value: object) -> str:
    from stage1_pro.report import format_value

    return format_value(value, missing="-", no="NO")


def table(rows: list) -> str:
    """The versions as an aligned text table (one line per version), then notes on odd ones."""
    header = ("", "version", "created", "blessed", "policy", "test coverage", "certified bound", "data")
    body = []
    notes = []
    for r in rows:
        if not r.complete:
            body.append(("", r.version, "-", "INCOMPLETE", "-", "-", "-", "-"))
            notes.append(
                f"{r.version}: no bundle.json — an unfinished or failed publish; pull and rollback refuse it"
            )
            continue
        if r.error:
            body.append(("*" if r.latest else "", r.version, "-", "UNREADABLE", "-", "-", "-", "-"))
            notes.append(f"{r.version}: {r.error}")
            continue
        bound = _fmt(r.certified_bound)
        if r.certified_bound is not None and r.target_fnr_exit is not None:
            bound += f" (<= {r.target_fnr_exit:g})"
        body.append(
            (
                "*" if r.latest else "",
                r.version,
                _fmt(r.created_at),
                _fmt(r.blessed),
                _fmt(r.policy),
                _fmt(r.test_coverage),
                bound,
                (r.data_fingerprint or "-")[:FINGERPRINT_CHARS],
            )
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip() for b in body]
    return "\n".join(lines + (["", *notes] if notes else []))


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import sys

    from stage1_pro.registry import LATEST, describe_versions, read_latest

    pointer = read_latest(args.prefix)
    rows = describe_versions(args.prefix, pointer)
    if args.json:
        out = {"versions": [dataclasses.asdict(r) for r in rows], "latest": pointer}
        print(json.dumps(out, indent=2))
        return 0
    if not rows:
        print(
            f"no versions under {args.prefix} (nothing published yet, or a mistyped prefix)", file=sys.stderr
        )
        return 0
    print(table(rows))
    if pointer is None:
        print(
            f"\n{args.prefix}/{LATEST}: not set (publish with latest, or 'stage1-pro rollback --to VERSION')"
        )
    else:
        how = pointer.get("action", "publish")
        print(f"\n* {LATEST} -> {pointer['version']} ({how} at {pointer['published_at']})")
    if args.history and pointer is not None:
        print("\nmoves of latest (newest first):")
        for move in pointer.get("history") or []:
            print(f"  {move['moved_at']}  {move['action']:<8}  {move['version']}")
    return 0
