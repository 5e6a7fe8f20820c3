"""The run-directory layout: one name per file, joined the same way locally and on gs://."""

from __future__ import annotations

from pathlib import Path

from stage1_pro.layout import RunDir


def test_run_dir_names_its_files_locally_and_on_gcs(tmp_path: Path) -> None:
    local, remote = RunDir(tmp_path), RunDir("gs://bucket/runs/a/")
    assert local.scores == str(tmp_path / "scores.npz")
    assert remote.scores == "gs://bucket/runs/a/scores.npz"
    assert remote.last_checkpoint == "gs://bucket/runs/a/checkpoints/last.pth"
    assert (local.config, local.splits, local.model, local.model_info) == tuple(
        str(tmp_path / name) for name in ("config.json", "splits.json", "model_best.pth", "model.json")
    )
