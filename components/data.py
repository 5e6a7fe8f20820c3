"""Data components: deterministic splits, and decoding every image once into training shards."""

from kfp.dsl import Dataset, Input, Output

from stage1_pro.components.base import stage1_component


@stage1_component
def split(data_uri: str, data_fingerprint: str, seed: int, splits: Output[Dataset]):
    """Split the dataset into train / val_select / val_calib / test (splits.json).

    Deterministic for a seed, stratified by label and group-aware (a manifest's group column keeps
    near-duplicates in one split). val_select is used to choose and fit (checkpoint, calibrators,
    testing order), val_calib only to certify, test only to audit.

    Args:
        data_uri: Dataset manifest or image-folder prefix (local or gs://).
        data_fingerprint: Fingerprint from the fingerprint step; the split fails if the dataset
            changed in between, and a new fingerprint invalidates the cached split.
        seed: Split seed.
        splits: The validated splits.json (indices per split, class balance, dataset fingerprint).
    """
    from stage1_pro.errors import DataError
    from stage1_pro.splits import split_dataset

    result = split_dataset(data_uri, splits.path, seed=seed)
    found = result["dataset"]["fingerprint"]
    if found != data_fingerprint:
        raise DataError(
            f"{data_uri}: the dataset changed while the pipeline ran (fingerprint {found[:12]}... now, "
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
def prepare(
    data_uri: str,
    data_fingerprint: str,
    img_size: int,
    preprocessing: dict,
    splits: Input[Dataset],
    prepared: Output[Dataset],
):
    """Decode every image once, resized to the training resolution, into compact shards.

    Training then reads shards instead of decoding full-size photos every epoch (a 12-MP JPEG
    decodes at about 5 images/s per CPU core). Runs on CPU with parallel workers; cached on the
    data fingerprint, the image size and the preprocessing modes. Corrupt images are reported by
    name and left out.

    Args:
        data_uri: Dataset manifest or image-folder prefix (local or gs://).
        data_fingerprint: Dataset fingerprint (cache key: a changed dataset is prepared again).
        img_size: Training resolution in pixels.
        preprocessing: resize_mode, decode_mode and interpolation of the config (check-config's
            output); recorded in the shards' index, which train checks against its config.
        splits: splits.json from the split step.
        prepared: Folder of shards and their index.
    """
    from stage1_pro.prepare import prepare_dataset
    from stage1_pro.preprocessing import PixelSpec

    spec = PixelSpec.from_record(img_size, preprocessing, "check-config's preprocessing")
    summary = prepare_dataset(data_uri, splits.path, prepared.path, spec)
    n_images = sum(int(shard["n"]) for shard in summary["shards"])
    prepared.metadata.update(
        {
            "img_size": img_size,
            **preprocessing,
            "data_fingerprint": data_fingerprint,
            "n": n_images,
            "n_failed": summary["n_failed"],
        }
    )
    print(
        f"[stage1-pro] prepare: {n_images} images ({spec.describe()}) in {len(summary['shards'])} shard(s), "
        f"{summary['n_failed']} failed to decode ({summary['seconds']:.1f} s, {summary['workers']} workers)"
    )
    for failure in summary["failed"][:20]:
        print(f"[stage1-pro]   skipped {failure['uri']} ({failure['split']}): {failure.get('error', '')}")
