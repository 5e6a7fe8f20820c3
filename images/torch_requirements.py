"""Print the ``torch`` / ``torchvision`` pins of a stage1-pro wheel, one requirement a line.

The Dockerfiles install these two from a PyTorch index (CPU build for the CPU image) *before*
the wheel, so the wheel's own ``torch==X`` pin is already satisfied and pip does not pull the
multi-GB CUDA build from PyPI into the CPU image. Reading the pins from the wheel keeps
``pyproject.toml`` their one source. Stdlib only: it runs in the build stage.

Usage: ``python torch_requirements.py dist/stage1_pro-*.whl > torch-requirements.txt``
"""

from __future__ import annotations

import re
import sys
import zipfile
from email.parser import HeaderParser

PINNED = ("torch", "torchvision")
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)\s*==\s*(?P<version>[^\s;,]+)\s*$")


def torch_requirements(wheel_path: str) -> list[str]:
    """Return ``["torch==X", "torchvision==Y"]`` read from the wheel's ``METADATA``.

    Raises ``SystemExit`` naming the wheel when a pin is missing or is not an exact ``==`` pin
    (a range would let the CPU and GPU images resolve different builds).
    """
    with zipfile.ZipFile(wheel_path) as whl:
        names = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise SystemExit(f"{wheel_path}: expected one *.dist-info/METADATA, found {len(names)}")
        metadata = HeaderParser().parsestr(whl.read(names[0]).decode("utf-8"))
    pins: dict[str, str] = {}
    for requirement in metadata.get_all("Requires-Dist") or []:
        spec = requirement.split(";", 1)[0].strip()
        name = re.split(r"[\s<>=!~\[(]", spec, maxsplit=1)[0].lower()
        if name in PINNED:
            match = _PIN.match(spec)
            if match is None:
                raise SystemExit(
                    f"{wheel_path}: Requires-Dist {requirement!r} is not an exact pin; pin {name}==X.Y.Z "
                    "in pyproject.toml so the CPU and GPU images install the same release"
                )
            pins[name] = f"{name}=={match['version']}"
    missing = [name for name in PINNED if name not in pins]
    if missing:
        raise SystemExit(f"{wheel_path}: no Requires-Dist pin for {', '.join(missing)}")
    return [pins[name] for name in PINNED]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: torch_requirements.py WHEEL")
    print("\n".join(torch_requirements(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
