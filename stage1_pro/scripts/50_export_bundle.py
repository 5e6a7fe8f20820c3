"""Step 50: export a validated run directory as a deployable bundle.

Same flags and behaviour as ``stage1-pro export`` (it calls the same function,
``stage1_pro.bundle.export_bundle``)::

    python stage1_pro/scripts/50_export_bundle.py --run runs/exp1 --out bundles/exp1 [--allow-unblessed]
"""

import sys

from stage1_pro.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
