"""Step 40: audit the run's exit policy on test and decide the blessing.

Same flags and behaviour as ``stage1-pro validate``::

    python stage1_pro/scripts/40_validate.py --run runs/exp1 [--champion PREFIX] [--min-coverage 0.1]
"""

from stage1_pro.cli import run_verb

if __name__ == "__main__":
    run_verb("validate")
