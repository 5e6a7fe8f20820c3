"""Upload the pipeline to a Kubeflow Pipelines server.

The first upload creates pipeline NAME; later uploads add a version to it, named after the
package's content (<stage1-pro version>-<sha256[:12]>), so uploading an unchanged package again
reuses that version. A --version that already exists is reused only when it holds the same
pipeline spec; a changed package under a taken name is refused (pick another --version, or omit
it). Without --package the current code is compiled first (same options as
'stage1-pro compile').
"""

from __future__ import annotations

import argparse
import os

from stage1_pro.cli.compile import add_image_arguments, compile_options


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Connection options shared by upload, run and schedule."""
    group = parser.add_argument_group("Kubeflow Pipelines server")
    group.add_argument(
        "--host",
        default=os.environ.get("KFP_HOST"),
        help="API endpoint, e.g. http://localhost:8080 after 'kubectl port-forward svc/ml-pipeline-ui' "
        "(default: $KFP_HOST)",
    )
    group.add_argument("--namespace", help="Kubernetes namespace (multi-user Kubeflow only)")
    group.add_argument(
        "--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (default: $KFP_TOKEN)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument(
        "--name", default="stage1-pro", help="pipeline name in Kubeflow (default: %(default)s)"
    )
    parser.add_argument("--package", metavar="YAML", help="compiled pipeline (default: compile now)")
    parser.add_argument(
        "--version", help="version name (default: <stage1-pro version>-<sha256 of the package>)"
    )
    parser.add_argument("--description", help="description shown in the UI")
    add_image_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from stage1_pro.pipelines.client import connect, upload
    from stage1_pro.pipelines.compile import compiled_package

    with compiled_package(args.package, **compile_options(args)) as package:
        client = connect(args.host, namespace=args.namespace, token=args.token)
        result = upload(client, package, args.name, version=args.version, description=args.description)
    if result.created_pipeline:
        what = "created pipeline"
    elif result.reused_version:
        what = "same pipeline spec; reused existing version of"
    else:
        what = "new version of"
    print(
        f"{what} {args.name!r}: pipeline {result.pipeline_id}, "
        f"version {result.version_name} ({result.version_id})"
    )
    return 0
