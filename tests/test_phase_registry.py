"""The phase registry: every phase registered once, where it is defined, as soon as training is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stage1_pro.training import phases


def test_importing_the_recipes_module_alone_registers_all_six_phases_built() -> None:
    # A fresh interpreter: the registry must be complete however it is reached.
    code = (
        "from stage1_pro.training.phases import PHASES\n"
        "print(sorted(PHASES), all(r.built for r in PHASES.values()), PHASES[5].train_step is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[1,", "2,", "3,", "4,", "5,", "6]", "True", "True"]


def test_a_phase_cannot_be_registered_twice() -> None:
    message = r"phase 4 is already registered \(ExPLoRA\); a phase has one recipe"
    with pytest.raises(ValueError, match=message):
        phases.register_phase(phases.PhaseRecipe(phase=4, name="ExPLoRA again", built=False))
    assert phases.PHASES[4].built and phases.PHASES[4].before_training is not None


def test_recipes_are_built_by_keyword() -> None:
    with pytest.raises(TypeError):
        phases.PhaseRecipe(7, "positional")  # type: ignore[misc]
