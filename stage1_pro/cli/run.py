"""Start one pipeline run on a Kubeflow Pipelines server.

Parameters are given as --param key=value (types follow the pipeline: ints, floats, JSON objects
for config_overrides) and checked here first: a phase/policy mismatch or a missing data_uri fails
before anything is submitted. The run uses a package (--package, or the current code compiled
now), or an uploaded version (--pipeline NAME [--version V]; default the newest).
"""

from __future__ import annotations

import argparse

from stage1_pro.cli.compile import add_image_arguments, compile_options
from stage1_pro.cli.upload import add_server_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument(
        "--experiment", default="stage1-pro", help="experiment (created if missing; default: %(default)s)"
    )
    add_param_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--package", metavar="YAML", help="compiled pipeline (default: compile now)")
    source.add_argument("--pipeline", metavar="NAME", help="run an uploaded pipeline instead of a package")
    parser.add_argument("--version", help="with --pipeline: the version name (default: the newest)")
    parser.add_argument("--run-name", help="display name of the run (default: stage1-pro-<exit_policy>)")
    parser.add_argument("--pipeline-root", help="artifact root for this run, e.g. gs://BUCKET/pipeline-root")
    parser.add_argument("--no-cache", action="store_true", help="recompute every task of this run")
    add_image_arguments(parser)


def add_param_arguments(parser: argparse.ArgumentParser) -> None:
    from stage1_pro.run_parameters import PARAMETER_NAMES

    parser.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"pipeline parameter (repeatable); keys: {', '.join(PARAMETER_NAMES)}",
    )


def run(args: argparse.Namespace) -> int:
    from stage1_pro.errors import ConfigError
    from stage1_pro.pipelines.client import connect, find_version, submit_run
    from stage1_pro.pipelines.compile import compiled_package
    from stage1_pro.run_parameters import check_parameters, parse_assignments

    params = parse_assignments(args.param)
    check_parameters(params)  # before compiling or connecting
    if args.version and not args.pipeline:
        raise ConfigError("--version needs --pipeline NAME (the uploaded pipeline it belongs to)")
    common = {
        "experiment": args.experiment,
        "params": params,
        "run_name": args.run_name,
        "pipeline_root": args.pipeline_root,
        "enable_caching": False if args.no_cache else None,
    }
    if args.pipeline:
        client = connect(args.host, namespace=args.namespace, token=args.token)
        version = find_version(client, args.pipeline, args.version)
        run_id = submit_run(client, version=version, **common)
        print(f"started run {run_id} of {args.pipeline!r} version {version.version_name}")
        return 0
    with compiled_package(args.package, **compile_options(args)) as package:
        client = connect(args.host, namespace=args.namespace, token=args.token)
        run_id = submit_run(client, package=package, **common)
    print(f"started run {run_id}")
    return 0
