"""Check a live cluster before running the pipeline on it: the first step on a new cluster.

Reads the cluster with your kubeconfig (or the in-cluster service account), the Kubeflow Pipelines
API (--host / KFP_HOST) and the pipeline root's bucket (your Google credentials), and prints one
line per check, each failing line with its fix:

  KFP backend version         >= what the compiled pipeline needs (e.g. nodeSelectorJson: 2.5)
  pipeline namespace          exists (a profile namespace: labelled as one)
  runner ServiceAccount       exists, with its Workload Identity annotation
  kfp-launcher pipeline root  a gs:// defaultPipelineRoot
  GPU node pool               nodes with the train task's accelerator label, allocatable
                              nvidia.com/gpu and only taints it tolerates (or a node pool at zero)
  quota for one run           ResourceQuota and LimitRange room for the train pod
  buckets                     the pipeline root's bucket exists; the runner is granted on it

Exit status 0 when nothing failed (warnings allowed), 2 otherwise; an unreachable cluster is one
line and exit status 2. Run parameters (-p gpu_type=..., -p gpu_count=..., -p data_uri=...) size
the checks like 'stage1-pro run' would.
"""

from __future__ import annotations

import argparse

from stage1_pro.cli.compile import add_image_arguments, compile_options
from stage1_pro.cli.run import add_param_arguments
from stage1_pro.cli.upload import add_server_arguments
from stage1_pro.cluster import PIPELINE_NAMESPACE, PIPELINE_SERVICE_ACCOUNT

#: Stands in for data_uri when none is given: the checks need the train pod's size, not the data.
_SIZING_DATA_URI = "gs://unused/manifest.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    group = parser.add_argument_group("Kubernetes")
    group.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    )
    group.add_argument("--context", help="kubeconfig context (default: the current one)")
    group.add_argument(
        "--service-account",
        default=PIPELINE_SERVICE_ACCOUNT,
        help="the runner's Kubernetes service account (default: %(default)s; multi-user: default-editor)",
    )
    add_param_arguments(parser)
    parser.add_argument("--package", metavar="YAML", help="compiled pipeline (default: compile now)")
    add_image_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from stage1_pro.pipelines.backend_features import CompiledPackage
    from stage1_pro.pipelines.client import KFPError, connect
    from stage1_pro.pipelines.compile import compiled_package
    from stage1_pro.pipelines.doctor import FAIL, Cluster, Target, report, run_checks
    from stage1_pro.run_parameters import check_parameters, defaults, parse_assignments

    params = parse_assignments(args.param)
    checked = check_parameters({"data_uri": _SIZING_DATA_URI, **params})
    values = {**defaults(), **params}
    namespace = args.namespace or PIPELINE_NAMESPACE
    target = Target(
        namespace=namespace,
        service_account=args.service_account,
        gpu_node_selector=checked.gpu_node_selector,
        gpu_count=int(values["gpu_count"]),
        train_cpu=checked.train_cpu_request,
        train_memory=checked.train_memory_request,
        uris=tuple(
            v for k in ("data_uri", "publish_prefix") if (v := str(params.get(k, ""))).startswith("gs://")
        ),
    )
    k8s = Cluster.connect(args.kubeconfig, args.context)  # unreachable: one line, exit 2
    with compiled_package(args.package, **compile_options(args)) as path:
        package = CompiledPackage.load(path)
    kfp_client, kfp_error = None, None
    if args.host:
        try:
            kfp_client = connect(args.host, namespace=args.namespace, token=args.token)
        except KFPError as exc:
            kfp_error = str(exc)
    print(
        f"stage1-pro doctor: cluster {k8s.host} (context {k8s.context}), namespace {namespace}, "
        f"KFP {args.host or 'not given (--host)'}"
    )
    checks = run_checks(k8s, package, target, kfp_client, kfp_error)
    print(report(checks))
    return 2 if any(c.status == FAIL for c in checks) else 0
