"""Training: the engine (:func:`train`), phase recipes, checkpoints, data parallelism, scoring.

``train(config, *, data_uri=None, prepared_uri=None, splits_uri, out_dir, resume=True) -> dict``
is what ``stage1-pro train``, ``stage1_pro/scripts/20_train.py`` and the KFP train component call.
Importing this package registers every phase recipe (:data:`~stage1_pro.training.phases.PHASE_MODULES`).
"""

import importlib

from stage1_pro.training.engine import train
from stage1_pro.training.phases import PHASE_MODULES, PHASES, PhaseRecipe, get_phase, register_phase

for _module in PHASE_MODULES:  # each registers the recipes it defines
    importlib.import_module(_module)

__all__ = ["PHASES", "PhaseRecipe", "get_phase", "register_phase", "train"]
