"""What the console shows: known harmless warnings and Lightning's start-up tips filtered in one place, and a copy of
the console in the run folder's ``train.log``.

Each filter names the message it drops and why it is harmless; anything not listed here is shown as before.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

# (message regex, category, why it is harmless here)
KNOWN_WARNINGS = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        "Lightning's own pytree helper uses an API that newer torch deprecates; nothing of ours calls it",
    ),
    (
        r"Your `IterableDataset` has `__len__` defined",
        UserWarning,
        "our shard streams deal whole shards to ranks and loader workers themselves, so each worker's length is exact",
    ),
    (
        r"Checkpoint directory .* exists and is not empty",
        UserWarning,
        "a run dir is reused on purpose: rerunning a command resumes the run into its own checkpoints/ folder",
    ),
    (
        r"You're resuming from a checkpoint that ended before the epoch ended",
        UserWarning,
        "the DataModule saves and restores its stream position itself (state_dict), which Lightning cannot see",
    ),
    (
        r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
        UserWarning,
        "eval.py restores a checkpoint to score its weights; the training callbacks' bookkeeping plays no part there",
    ),
    (
        r".*torch\.nn\.utils\.weight_norm.*deprecated",
        FutureWarning,
        "encodec builds its layers with the old weight_norm (its checkpoints' state-dict keys): its code, not ours",
    ),
    (
        r"Precision .* is not supported by the model summary",
        UserWarning,
        "the model summary (trainer.enable_model_summary=true) only estimates the size in MB for bf16/fp16 runs",
    ),
)

# (logger, message prefix, why it is dropped): Lightning's start-up information; the run summary gives what matters
_RANK_ZERO = "lightning.pytorch.utilities.rank_zero"  # Lightning's rank_zero_info
KNOWN_INFO = (
    (_RANK_ZERO, "GPU available:", "the summary names the hardware profile"),
    (_RANK_ZERO, "TPU available:", "no TPU support in this suite"),
    (_RANK_ZERO, "HPU available:", "no HPU support in this suite"),
    (_RANK_ZERO, "💡 Tip:", "an advertisement for a cloud logger"),
    (_RANK_ZERO, "Using bfloat16 Automatic Mixed", "the summary names the precision"),
    (_RANK_ZERO, "Using 16bit Automatic Mixed", "the summary names the precision"),
    ("lightning.pytorch.accelerators.cuda", "LOCAL_RANK:", "the device list of every rank, at every start"),
    (_RANK_ZERO, "Restoring states from the checkpoint", "the run dir line names it: (resuming <ckpt>)"),
    (_RANK_ZERO, "Restored all states from the checkpoint", "the run dir line names it: (resuming <ckpt>)"),
    (_RANK_ZERO, "Loaded model weights from the checkpoint", "eval.py prints the checkpoint with its metrics"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet() -> None:
    """Apply :data:`KNOWN_WARNINGS` and :data:`KNOWN_INFO` (the entry points call this first thing)."""
    for message, category, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    by_logger: dict[str, list[str]] = {}
    for name, prefix, _ in KNOWN_INFO:
        by_logger.setdefault(name, []).append(prefix)
    # Lightning's rank_zero_info logs through whichever of its two rank_zero loggers was imported last
    by_logger["lightning.fabric.utilities.rank_zero"] = by_logger[_RANK_ZERO]
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, _DropMessages)]
        logger.addFilter(_DropMessages(tuple(prefixes)))


# ---------------------------------------------------------------------------------------------------
# train.log: a copy of the console
# ---------------------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Tee:
    """Stands in for ``sys.stdout`` / ``sys.stderr``: everything goes to the real stream, and each finished line to
    the log, as the terminal shows it in the end (a progress bar's last state, not every redraw; colours dropped)."""

    def __init__(self, stream, log: ConsoleLog):
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        *lines, pending = (self.pending + text).split("\n")
        for line in lines:
            self.log.add_line(line)
        cut = pending.rfind("\r")  # a redraw replaces the line: keep its latest state only
        self.pending = pending[cut:] if cut > 0 else pending
        return n

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.stream.flush()

    def finish(self) -> None:
        if self.pending:
            self.log.add_line(self.pending)
        self.pending = ""

    def __getattr__(self, name):  # isatty, fileno, encoding, ... are the real stream's
        return getattr(self.stream, name)


class ConsoleLog:
    """Copies the console (prints, warnings, logging records, tqdm bars) of this process into a file.

    ``with ConsoleLog() as log:`` starts copying into memory; ``log.attach(path)`` writes what was held so far to
    ``path`` (appending) and every later line as it is finished; leaving the block puts the streams back, and an
    exception that ends the block is written to the file with its traceback. Not attached, nothing is written.
    Lines are written by this process only (forked loader workers inherit the streams but not the file).
    """

    def __init__(self):
        self.lines: list[str] = []
        self.file = None
        self.pid = os.getpid()
        self._saved: list = []

    def add_line(self, line: str) -> None:
        if os.getpid() != self.pid:
            return
        segments = _ANSI.sub("", line).split("\r")
        text = segments[-1].rstrip()
        if len(segments) > 1 and not text.strip():  # a line a progress bar cleared
            return
        if self.file is None:
            self.lines.append(text)
        else:
            self.file.write(text + "\n")
            self.file.flush()

    def attach(self, path: str | os.PathLike) -> None:
        self.file = open(Path(path), "a", encoding="utf-8")  # noqa: SIM115 (closed when the block ends)
        self.file.write("".join(line + "\n" for line in self.lines))
        self.file.flush()
        self.lines = []

    def __enter__(self) -> ConsoleLog:
        tees = {id(sys.stdout): _Tee(sys.stdout, self), id(sys.stderr): _Tee(sys.stderr, self)}
        self._saved = [(sys, "stdout", sys.stdout), (sys, "stderr", sys.stderr)]
        # logging handlers hold the stream they were given (Hydra's console handler, Lightning's own)
        named = logging.Logger.manager.loggerDict.values()
        loggers = [logging.getLogger(), *(v for v in named if isinstance(v, logging.Logger))]
        for logger in loggers:
            for handler in logger.handlers:
                stream = getattr(handler, "stream", None)
                if isinstance(handler, logging.StreamHandler) and id(stream) in tees:
                    self._saved.append((handler, "stream", stream))
                    handler.stream = tees[id(stream)]
        sys.stdout, sys.stderr = tees[id(sys.stdout)], tees[id(sys.stderr)]
        self._tees = list(tees.values())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for tee in self._tees:
            tee.flush()
            tee.finish()
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        if self.file is not None:
            if exc is not None and not isinstance(exc, SystemExit | KeyboardInterrupt):
                self.file.write("".join(traceback.format_exception(exc_type, exc, tb)))
            elif isinstance(exc, SystemExit | KeyboardInterrupt):
                self.file.write(f"{exc_type.__name__}: {exc}\n")
            self.file.close()
            self.file = None
