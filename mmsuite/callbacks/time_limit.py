"""``trainer.max_time`` as a per-command limit: a run stops cleanly after that long, and the same command continues
it from ``last.ckpt`` for another ``max_time``.

Lightning's own :class:`~lightning.pytorch.callbacks.Timer` (what ``Trainer(max_time=...)`` installs) does the timing
and the clean stop; it also restores the time elapsed before a resume, which makes ``max_time`` a limit on the whole
run, so a rerun of the same command would stop at once. :class:`CommandTimer` keeps Lightning's timer and drops that
restore; Lightning then uses it instead of building its own.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Timer


class CommandTimer(Timer):
    """Lightning's step-interval :class:`Timer` whose clock starts at zero in every command (see the module)."""

    def __init__(self, duration):
        super().__init__(duration=duration, interval="step", verbose=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Each command gets its own ``max_time``: the time earlier commands trained is not counted."""

    @property
    def expired(self) -> bool:
        """Whether the time limit stopped the run (rather than ``max_steps`` or a budget)."""
        return self._duration is not None and self.time_elapsed() >= self._duration
