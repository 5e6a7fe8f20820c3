"""Schedule recurring retraining on a Kubeflow Pipelines server (idempotent).

The cron expression has KFP's 6 fields, seconds first ('0 0 2 * * *' is 02:00 every day), or a
descriptor ('@daily', '@every 12h'); it is checked here before anything is sent. The package is
uploaded as a new version of --pipeline and the recurring run NAME is pinned to that version,
with max_concurrency=1 and no catch-up of missed runs. KFP cannot update a recurring run, so
scheduling an existing NAME again creates the new one and then deletes the previous ones:
re-running this command after a code change is how a schedule moves to the new code.
"""

from __future__ import annotations

import argparse

from stage1_pro.cli.compile import add_image_arguments, compile_options
from stage1_pro.cli.run import add_param_arguments
from stage1_pro.cli.upload import add_server_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--name", required=True, help="recurring run name (replaced if it exists)")
    parser.add_argument("--cron", help="6-field KFP cron, seconds first, e.g. '0 0 2 * * *'")
    parser.add_argument("--experiment", default="stage1-pro", help="experiment (default: %(default)s)")
    parser.add_argument(
        "--pipeline", default="stage1-pro", help="pipeline to add the version to (default: %(default)s)"
    )
    add_param_arguments(parser)
    parser.add_argument("--package", metavar="YAML", help="compiled pipeline (default: compile now)")
    parser.add_argument(
        "--pipeline-root", help="artifact root of the scheduled runs, e.g. gs://BUCKET/pipeline-root"
    )
    parser.add_argument("--remove", action="store_true", help="delete the recurring run NAME instead")
    add_image_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from stage1_pro.errors import ConfigError
    from stage1_pro.pipelines.client import connect, schedule, unschedule, validate_cron
    from stage1_pro.pipelines.compile import compiled_package
    from stage1_pro.run_parameters import check_parameters, parse_assignments

    if args.remove:
        client = connect(args.host, namespace=args.namespace, token=args.token)
        removed = unschedule(client, name=args.name, experiment=args.experiment)
        print(f"deleted {len(removed)} recurring run(s) named {args.name!r}: {', '.join(removed) or '-'}")
        return 0
    if not args.cron:
        raise ConfigError(
            "--cron is required (6 fields, seconds first, e.g. '0 0 2 * * *'), or pass --remove"
        )
    cron = validate_cron(args.cron)
    params = parse_assignments(args.param)
    check_parameters(params)
    with compiled_package(args.package, **compile_options(args)) as package:
        client = connect(args.host, namespace=args.namespace, token=args.token)
        result = schedule(
            client,
            name=args.name,
            cron=cron,
            package=package,
            params=params,
            experiment=args.experiment,
            pipeline_name=args.pipeline,
            pipeline_root=args.pipeline_root,
        )
    replaced = f"; replaced {', '.join(result.replaced)}" if result.replaced else ""
    print(
        f"scheduled {args.name!r} ({cron}): recurring run {result.recurring_run_id} pinned to "
        f"{args.pipeline} version {result.upload.version_name}{replaced}"
    )
    return 0
