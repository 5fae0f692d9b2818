"""The console: known harmless warnings filtered in one place, and train.log holding what the console showed."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mmsuite.console import KNOWN_WARNINGS, ConsoleLog, quiet

ROOT = Path(__file__).resolve().parents[2]


def test_known_warnings_are_dropped_and_others_still_shown():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet()
        warnings.warn("Your `IterableDataset` has `__len__` defined. In combination ...", UserWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("Checkpoint directory /x/checkpoints exists and is not empty.", UserWarning, stacklevel=1)
        warnings.warn("`torch.nn.utils.weight_norm` is deprecated in favor of ...", FutureWarning, stacklevel=1)
        warnings.warn("something real went wrong", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something real went wrong"]
    assert all(len(reason) > 20 for _, _, reason in KNOWN_WARNINGS)  # each filter says why


def test_lightnings_start_up_tips_are_dropped_and_its_other_messages_kept(caplog):
    quiet()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        log.info("GPU available: False, used: False")
        log.info("💡 Tip: For seamless cloud logging ...")
        log.info("Restoring states from the checkpoint path at /runs/x/checkpoints/last.ckpt")
        log.info("Loaded model weights from the checkpoint at /runs/x/checkpoints/last.ckpt")
        log.info("`Trainer.fit` stopped: `max_steps=8` reached.")
    assert [r.getMessage() for r in caplog.records] == ["`Trainer.fit` stopped: `max_steps=8` reached."]


def test_train_log_holds_prints_warnings_logging_and_the_final_state_of_bars(tmp_path, capsys):
    from tqdm import tqdm

    path = tmp_path / "train.log"
    handler = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger("mmsuite.test.console")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with ConsoleLog() as console:
            print("before the run dir exists")
            console.attach(path)
            logger.warning("a logging record")
            for _ in tqdm(range(50), desc="bar", mininterval=0, file=sys.stderr):
                pass
            print("\x1b[31mred\x1b[0m text")
        print("after the block")
    finally:
        logger.removeHandler(handler)
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "before the run dir exists"
    assert "a logging record" in text
    assert [line for line in lines if line.startswith("bar")] == [lines[-2]] and "50/50" in lines[-2]
    assert lines[-1] == "red text" and "after the block" not in text
    out = capsys.readouterr()
    assert "after the block" in out.out and "\x1b[31mred" in out.out  # the terminal gets everything as it was


def test_warnings_land_in_the_log(tmp_path):
    """In a process of its own: pytest records warnings instead of showing them."""
    path = tmp_path / "train.log"
    code = (
        "import warnings\nfrom mmsuite.console import ConsoleLog\n"
        f"with ConsoleLog() as console:\n    console.attach({str(path)!r})\n    warnings.warn('a real warning')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "UserWarning: a real warning" in path.read_text() and "a real warning" in proc.stderr


def test_nothing_is_written_unless_attached_and_a_failure_lands_in_the_log(tmp_path):
    with ConsoleLog():
        print("a run that stopped before it started")
    assert not list(tmp_path.iterdir())
    path = tmp_path / "train.log"
    with pytest.raises(ValueError), ConsoleLog() as console:
        console.attach(path)
        raise ValueError("the data set is broken")
    assert "ValueError: the data set is broken" in path.read_text() and "Traceback" in path.read_text()
    assert sys.stdout is sys.__stdout__ or not hasattr(sys.stdout, "log")  # the streams are put back
