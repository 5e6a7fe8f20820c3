"""Progress reporting: a tqdm bar on a terminal, periodic log lines otherwise (pods, CI, files)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_LOG = logging.getLogger("stage1_pro.training")


class Progress:
    """Per-epoch progress over ``total`` steps; ``update(**values)`` after each step.

    Values are formatted lazily (a tensor is only synchronised when shown), so logging does not
    stall the GPU every step.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, log_every: int = 20) -> None:
        self.total, self.desc, self.log_every = total, desc, max(1, log_every)
        self.enabled = enabled
        self.step = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    @staticmethod
    def _fmt(values: dict[str, Any]) -> str:
        return " ".join(f"{k}={float(v):.4g}" for k, v in values.items())

    def update(self, **values: Any) -> None:
        self.step += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if self.step % self.log_every == 0 or self.step == self.total:
                self.bar.set_postfix_str(self._fmt(values))
        elif self.step % self.log_every == 0 or self.step == self.total:
            rate = self.step / max(1e-9, time.perf_counter() - self.start)
            _LOG.info(
                "%s step %d/%d (%.1f it/s) %s", self.desc, self.step, self.total, rate, self._fmt(values)
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
