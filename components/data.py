"""Data components: deterministic splits, and decoding every image once into training shards.

Decoding fans out: ``prepare`` runs once per item of ``plan_shards`` (a ``dsl.ParallelFor`` over
the pipeline's ``prepare_shards``), each pod decoding its contiguous block of shards, and
``merge_prepared`` assembles the one prepared folder train reads (byte for byte what one pod would
have written).
"""

from kfp.dsl import Dataset, Input, Output

from stage1_pro.components.base import stage1_component


@stage1_component
def split(dataset: Input[Dataset], data_fingerprint: str, seed: int, splits: Output[Dataset]):
    """Split the dataset into train / val_select / val_calib / test (splits.json).

    Deterministic for a seed, stratified by label and group-aware (a manifest's group column keeps
    near-duplicates in one split). val_select is used to choose and fit (checkpoint, calibrators,
    testing order), val_calib only to certify, test only to audit.

    Args:
        dataset: The run's dataset (dsl.importer of data_uri).
        data_fingerprint: Fingerprint from the fingerprint step; the split fails if the dataset
            changed in between, and a new fingerprint invalidates the cached split.
        seed: Split seed.
        splits: The validated splits.json (indices per split, class balance, dataset fingerprint).
    """
    from stage1_pro.errors import DataError
    from stage1_pro.splits import split_dataset

    result = split_dataset(dataset.uri, splits.path, seed=seed)
    found = result["dataset"]["fingerprint"]
    if found != data_fingerprint:
        raise DataError(
            f"{dataset.uri}: the dataset changed while the pipeline ran (fingerprint {found[:12]}... now, "
            f"{data_fingerprint[:12]}... at the start); rerun the pipeline"
        )
    balance = result["class_balance"]
    splits.metadata.update({name: int(balance[name]["n"]) for name in balance})
    splits.metadata["data_fingerprint"] = found
    print(
        "[stage1-pro] split: "
        + ", ".join(f"{name} {b['n']} ({b['positive_rate']:.1%} positive)" for name, b in balance.items())
    )


@stage1_component
def plan_shards(count: int, preprocessing: dict) -> list[dict]:
    """The items of the prepare fan-out: one per pod, with everything the pod needs from upstream.

    Each item is ``{"index": i, "count": count, "preprocessing": preprocessing}``. The values
    travel in the items, not as separate task outputs, because kfp.local (2.17) hands a task inside
    a ``dsl.ParallelFor`` the loop item in place of any upstream task's output; and the loop
    iterates this single-output step because kfp.local iterates no named output of a multi-output
    task. The items are typed ``dict`` so the backend declares the loop item a STRUCT and passes it
    as is. check-config has already checked ``count``.

    Args:
        count: Pods the decoding is spread over (the pipeline's prepare_shards).
        preprocessing: check-config's preprocessing modes (each pod decodes with them).

    Returns:
        One item per pod, ``index`` 0 .. count - 1.
    """
    return [{"index": i, "count": count, "preprocessing": preprocessing} for i in range(count)]


@stage1_component
def prepare(
    dataset: Input[Dataset],
    img_size: int,
    splits: Input[Dataset],
    shard: dict,
    workers: int,
    prepared: Output[Dataset],
) -> str:
    """Decode this pod's block of the images once, resized to the training resolution, into shards.

    Training then reads shards instead of decoding full-size photos every epoch (a 12-MP JPEG
    decodes at about 5 images/s per CPU core). Runs on CPU with parallel workers; cached on the
    splits (a new dataset fingerprint makes new splits), the image size and the preprocessing
    modes. Corrupt images are reported by name and left out. On a gs:// pipeline root the shards
    go straight to the artifact's URI, never through the pod's disk.

    Args:
        dataset: The run's dataset (dsl.importer of data_uri).
        img_size: Training resolution in pixels.
        splits: splits.json from the split step.
        shard: This pod's item of plan_shards: ``index`` (which block of the shards, 0-based),
            ``count`` (pods in the fan-out) and ``preprocessing`` (resize_mode, decode_mode and
            interpolation of the config, recorded in the shards' index, which train checks).
        workers: Decoding processes (the pod's CPU request).
        prepared: This pod's shards and their index.

    Returns:
        The URI of ``prepared``, for the merge step (a string: the merge copies the shards
        server-side instead of having every slice downloaded into its pod).
    """
    from stage1_pro.components.runtime import artifact_location
    from stage1_pro.prepare import prepare_dataset
    from stage1_pro.preprocessing import PixelSpec

    index, count, preprocessing = int(shard["index"]), int(shard["count"]), shard["preprocessing"]
    spec = PixelSpec.from_record(img_size, preprocessing, "check-config's preprocessing")
    out = artifact_location(prepared)
    summary = prepare_dataset(dataset.uri, splits.path, out, spec, workers, part=index, parts=count)
    n_images = sum(int(s["n"]) for s in summary["shards"])
    prepared.metadata.update(
        {
            "img_size": img_size,
            **preprocessing,
            "data_fingerprint": summary["dataset"]["fingerprint"],
            "n": n_images,
            "shard_index": index,
        }
    )
    print(
        f"[stage1-pro] prepare {index + 1}/{count}: {n_images} images ({spec.describe()}) in "
        f"{len(summary['shards'])} shard(s), {summary['n_failed']} failed to decode "
        f"({summary['seconds']:.1f} s, {summary['workers']} workers)"
    )
    for failure in summary["failed"][:20]:
        print(f"[stage1-pro]   skipped {failure['uri']} ({failure['split']}): {failure.get('error', '')}")
    return out


@stage1_component
def merge_prepared(slices: list[str], data_fingerprint: str, prepared: Output[Dataset]):
    """Assemble the prepare pods' shards into the one prepared folder (shards + rows.npz + index.json).

    The shards are copied server-side on GCS (no pixel passes through this pod); the result is the
    folder one prepare pod over all images would have written.

    Args:
        slices: The prepare pods' output URIs (any order).
        data_fingerprint: Dataset fingerprint (recorded in the metadata).
        prepared: Folder of shards and their index, what train reads.
    """
    from stage1_pro.components.runtime import artifact_location
    from stage1_pro.prepare import merge_prepared as merge

    summary = merge(slices, artifact_location(prepared))
    n_images = sum(int(shard["n"]) for shard in summary["shards"])
    prepared.metadata.update(
        {
            "img_size": summary["img_size"],
            "data_fingerprint": data_fingerprint,
            "n": n_images,
            "n_failed": summary["n_failed"],
        }
    )
    print(
        f"[stage1-pro] merge-prepared: {n_images} images in {len(summary['shards'])} shard(s) from "
        f"{len(slices)} pod(s), {summary['n_failed']} failed to decode"
    )
