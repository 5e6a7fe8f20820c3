"""Step 33: certified Platt/isotonic gate calibration -> gateparams.json.

Same flags and behaviour as ``stage1-pro calibrate --policy gate`` (it calls the same function,
``stage1_pro.calibrate.calibrate_policy``)::

    python stage1_pro/scripts/33_calibrate_gate.py --scores run/scores.npz --out run/gateparams.json
    python stage1_pro/scripts/33_calibrate_gate.py --run run [--target_fnr_exit 0.02] [--delta 0.1]
"""

import sys

from stage1_pro.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", "--policy", "gate", *sys.argv[1:]]))
