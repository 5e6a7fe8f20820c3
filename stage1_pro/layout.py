"""The files of a run directory and of a bundle: each name written once.

A run directory (``stage1-pro train --out RUN``) grows step by step, and a bundle is exported
from it with the same names::

    train      config.json  splits.json  model_best.pth  model.json  metrics.csv  scores.npz
               checkpoints/last.pth                      (resume state; never exported)
    calibrate  one policy file: thresholds.json | gateparams.json | scrcparams.json
    validate   validation.json  report.html  model_card.md  (+ the report's images)
    export     bundle.json  README.md  score_reference.json   (bundle only)

``stage1-pro drift --out DIR`` writes ``drift.json``, ``drift.png`` and ``drift.html``.

:class:`RunDir` names the URIs of one directory's files, local or ``gs://``::

    run = RunDir("gs://bucket/runs/a")
    run.scores        # 'gs://bucket/runs/a/scores.npz'
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from stage1_pro import storage

CONFIG_FILE = "config.json"
SPLITS_FILE = "splits.json"
MODEL_FILE = "model_best.pth"
MODEL_INFO_FILE = "model.json"
METRICS_FILE = "metrics.csv"
SCORES_FILE = "scores.npz"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT_FILE = "last.pth"
VALIDATION_FILE = "validation.json"
MODEL_CARD_FILE = "model_card.md"
BUNDLE_FILE = "bundle.json"
README_FILE = "README.md"
SCORE_REFERENCE_FILE = "score_reference.json"
DRIFT_FILE = "drift.json"
DRIFT_PLOT_FILE = "drift.png"
DRIFT_REPORT_FILE = "drift.html"


def _file(name: str) -> property:
    return property(lambda self: self.file(name), doc=f"URI of ``{name}`` in the directory.")


@dataclass(frozen=True)
class RunDir:
    """A run directory (local path or ``gs://`` prefix) and the URIs of its files.

    Args:
        root: The directory.
    """

    root: str | os.PathLike[str]

    def file(self, *parts: str) -> str:
        """URI of ``parts`` (a file name, or folder(s) then a file name) inside the directory."""
        return storage.join(self.root, *parts)

    config = _file(CONFIG_FILE)
    splits = _file(SPLITS_FILE)
    model = _file(MODEL_FILE)
    model_info = _file(MODEL_INFO_FILE)
    metrics = _file(METRICS_FILE)
    scores = _file(SCORES_FILE)
    validation = _file(VALIDATION_FILE)

    @property
    def last_checkpoint(self) -> str:
        """URI of the resume checkpoint, ``checkpoints/last.pth``."""
        return self.file(CHECKPOINT_DIR, LAST_CHECKPOINT_FILE)
