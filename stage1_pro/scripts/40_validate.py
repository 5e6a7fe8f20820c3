"""Step 40: audit the run's exit policy on test and decide the blessing.

Same flags and behaviour as ``stage1-pro validate`` (it calls the same function,
``stage1_pro.validate.validate_run``)::

    python stage1_pro/scripts/40_validate.py --run runs/exp1 [--champion PREFIX] [--min-coverage 0.1]
"""

import sys

from stage1_pro.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
