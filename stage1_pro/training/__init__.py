"""Training: the engine (:func:`train`), phase recipes, checkpoints, data parallelism, scoring.

``train(config, *, data_uri=None, prepared_uri=None, splits_uri, out_dir, resume=True) -> dict``
is what ``stage1-pro train``, ``stage1_pro/scripts/20_train.py`` and the KFP train component call.
"""

from stage1_pro.training.engine import train
from stage1_pro.training.phases import PHASES, PhaseRecipe, get_phase, register_phase

__all__ = ["PHASES", "PhaseRecipe", "get_phase", "register_phase", "train"]
