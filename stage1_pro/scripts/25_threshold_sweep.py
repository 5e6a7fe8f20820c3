"""Step 25: certified softmax threshold sweep -> thresholds.json.

Same flags and behaviour as ``stage1-pro calibrate --policy softmax`` (it calls the same function,
``stage1_pro.calibrate.calibrate_policy``)::

    python stage1_pro/scripts/25_threshold_sweep.py --scores run/scores.npz --out run/thresholds.json
    python stage1_pro/scripts/25_threshold_sweep.py --run run [--target_fnr_exit 0.02] [--delta 0.1]
"""

import sys

from stage1_pro.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", "--policy", "softmax", *sys.argv[1:]]))
