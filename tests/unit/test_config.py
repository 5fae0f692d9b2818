"""The config tree: every experiment composes and validates on every hardware profile (and under debug=smoke);
hardware profiles are complete in themselves; debug presets are ordinary values the command line overrides; typed
settings stop unknown keys, wrong types and invalid values with the key's full name."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import mmsuite.run  # noqa: F401  (registers the config resolvers)
from mmsuite.config import TARGETS, check_settings
from mmsuite.settings import SettingsError, as_dict, parse, setting

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
HARDWARE = sorted(p.stem for p in (CONF / "hardware").glob("*.yaml"))
HARDWARE_KEYS = {"accelerator", "devices", "num_nodes", "strategy", "precision"}


def _compose(*overrides: str, conf: Path = CONF, app: str = "train"):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        # paths.run_dir is Hydra's runtime output dir, which only a running app has
        return compose(app, overrides=["paths.run_dir=/nonexistent/run", *overrides])


@pytest.mark.parametrize("hardware", HARDWARE)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates_on_every_hardware(experiment, hardware):
    for debug in ([], ["debug=smoke"]):
        cfg = _compose(f"experiment={experiment}", f"hardware={hardware}", *debug)
        check_settings(cfg)  # builds the model's and data's settings objects: every rule checked
        assert cfg.hardware.name == hardware
        assert cfg.data.num_workers == (0 if experiment.startswith("dynamics") else cfg.hardware.num_workers)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("hardware", HARDWARE)
def test_hardware_profiles_are_complete_and_experiments_never_restate_them(hardware):
    profile = yaml.safe_load((CONF / "hardware" / f"{hardware}.yaml").read_text())
    assert profile["hardware"]["name"] == hardware
    assert {"threads", "num_workers"} <= set(profile["hardware"])
    assert HARDWARE_KEYS <= set(profile["trainer"])
    for path in [*(CONF / "experiment").glob("*.yaml"), *(CONF / "exp_hw").glob("*.yaml")]:
        text = yaml.safe_load(path.read_text()) or {}
        assert "per_hardware" not in text and "smoke" not in text, path
        assert "hardware" not in text, path
        allowed = {"precision"} if path.stem == "image_tokenizer_cpu" else set()  # native bf16 where the CPU has it
        restated = (HARDWARE_KEYS & set(text.get("trainer") or {})) - allowed
        assert not restated, f"{path} restates the hardware profile's {sorted(restated)}"


def test_a_new_hardware_profile_is_one_file(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "hardware" / "a100.yaml").write_text(
        "# @package _global_\nhardware: {name: a100, threads: 16, num_workers: 8}\n"
        "trainer: {accelerator: gpu, devices: 1, num_nodes: 1, strategy: auto, precision: bf16-mixed}\n"
    )
    for experiment in EXPERIMENTS:
        cfg = _compose(f"experiment={experiment}", "hardware=a100", conf=conf)
        check_settings(cfg)
        assert cfg.trainer.precision == "bf16-mixed" and cfg.hardware.threads == 16
        # no exp_hw/<experiment>_a100.yaml: the experiment's own (cpu) sizes
        assert cfg.data.batch_size == _compose(f"experiment={experiment}").data.batch_size


def test_gpu_profiles_share_one_specialisation_and_the_cpu_job_is_the_experiment_itself():
    gpu = _compose("experiment=dynamics", "hardware=gpu16gb")
    for hw in ("rtx4090", "ddp"):
        other = _compose("experiment=dynamics_shortcut", f"hardware={hw}")
        assert other.model.net == gpu.model.net and other.data.seq_len == gpu.data.seq_len == 32
    cpu = _compose("experiment=dynamics", "hardware=cpu")
    assert (cpu.model.net.dim, cpu.data.seq_len, cpu.model.optim.lr) == (128, 16, 0.003)
    assert _compose("experiment=dynamics").model.net == cpu.model.net  # hardware=cpu is the default


def test_debug_presets_are_values_the_command_line_overrides():
    cfg = _compose("experiment=m4_pose", "debug=smoke", "data.batch_size=3", "model.net.dim=16")
    assert (cfg.data.batch_size, cfg.model.net.dim, cfg.trainer.max_steps) == (3, 16, 8)
    # the experiment's smoke sizes, and on ddp_cpu their per-process batch
    smoke = _compose("experiment=m4_pose", "debug=smoke")
    assert (smoke.data.batch_size, smoke.modalities.grid, smoke.data.world.image_size) == (8, 4, 32)
    assert _compose("experiment=m4_pose", "debug=smoke", "hardware=ddp_cpu").data.batch_size == 4
    assert _compose("experiment=dynamics_shortcut", "debug=smoke", "hardware=ddp_cpu").data.long_batch_size == 1
    # fast_dev_run runs on the same smoke sizes
    assert _compose("experiment=m4_pose", "debug=fast_dev_run").modalities.grid == 4


def test_misspelled_or_mistyped_keys_fail_naming_the_key():
    with pytest.raises(ConfigCompositionException, match=r"model\.net\.dimm"):
        _compose("experiment=dynamics", "model.net.dimm=8")
    with pytest.raises(ConfigCompositionException) as e:
        _compose("data.batch_size=abc")
    assert "data.batch_size" in f"{e.value} {e.value.__cause__}"
    with pytest.raises(SettingsError, match=r"^model\.net\.dimm: unknown setting"):
        check_settings(_compose("experiment=dynamics", "+model.net.dimm=8"))  # '+' slips past composition
    with pytest.raises(SettingsError, match=r"^model\.noise\.tau_ctxx: unknown setting"):
        check_settings(_compose("experiment=dynamics", "+model.noise.tau_ctxx=0.1"))
    for bad in ("0", "-4"):
        with pytest.raises(SettingsError, match=rf"^data\.batch_size must be >= 1, got {bad}"):
            check_settings(_compose(f"data.batch_size={bad}"))
    with pytest.raises(SettingsError, match=r"^model\.schedule\.warmup_steps must be >= 0"):
        check_settings(_compose("schedule.warmup_steps=-1"))
    with pytest.raises(SettingsError, match=r"^model\.tasks\[1\]\.baseline must be one of"):
        check_settings(_compose("experiment=m4_pose", "model.tasks.1.baseline=mean"))


def test_every_model_and_data_option_starts_from_its_settings_class():
    for group, options in TARGETS.items():
        for option, cls in options.items():
            text = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
            assert text["defaults"][0] == f"{option}_schema", (group, option)
            assert hasattr(cls, "Settings")


# -- mmsuite.settings ------------------------------------------------------------------------------------------


@dataclass
class _Inner:
    rate: float = setting(0.5, ge=0.0, le=1.0)
    mode: str = setting("a", choices=["a", "b"])


@dataclass
class _Outer:
    inner: _Inner = setting(_Inner())
    sizes: list[int] = setting([1, 2], ge=1)
    borrowed: Any = setting({}, schema=_Inner)  # a block interpolated from elsewhere
    rows: list[Any] = setting([], items=_Inner)
    required: int = setting()


def test_parse_fills_defaults_and_names_every_bad_key():
    got = parse(_Outer, {"required": 3, "borrowed": {"mode": "b"}, "rows": [{}, {"rate": 1.0}]}, "model")
    assert as_dict(got) == {
        "inner": {"rate": 0.5, "mode": "a"},
        "sizes": [1, 2],
        "borrowed": {"rate": 0.5, "mode": "b"},
        "rows": [{"rate": 0.5, "mode": "a"}, {"rate": 1.0, "mode": "a"}],
        "required": 3,
    }
    cases = {
        r"^model\.inner\.rat: unknown setting \(_Inner has: rate, mode\)": {"inner": {"rat": 1}},
        r"^model\.inner\.rate: Value 'x' of type 'str' could not be converted to Float": {"inner": {"rate": "x"}},
        r"^model\.inner\.rate must be >= 0.0 and <= 1.0, got 2.0": {"inner": {"rate": 2}},
        r"^model\.inner\.mode must be one of \['a', 'b'\], got 'c'": {"inner": {"mode": "c"}},
        r"^model\.sizes must be >= 1, got \[1, 0\]": {"sizes": [1, 0]},
        r"^model\.borrowed\.mode must be one of": {"borrowed": {"mode": "z"}},
        r"^model\.rows\[1\]\.ratte: unknown setting": {"rows": [{}, {"rate": 1, "ratte": 2}]},
        r"^model\.required: required setting is missing": {},
    }
    for pattern, values in cases.items():
        with pytest.raises(SettingsError, match=pattern):
            parse(_Outer, {"required": 1, **values} if values else values, "model")


def test_modules_save_plain_containers_as_hyperparameters():
    """Checkpoints stay pickle-free: save_hyperparameters() holds dicts, lists and scalars, never dataclasses."""
    from mmsuite.lightning_modules.image_tokenizer import ImageTokenizerModule

    module = ImageTokenizerModule(net={"channels": 8, "levels": [8, 8, 8, 8]}, loss={"mse": 1.0})

    def plain(v) -> bool:
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, bool | int | float | str)

    hp = dict(module.hparams)
    assert plain(hp) and hp["net"]["channels"] == 8 and hp["net"]["patch_size"] == 4  # defaults filled in
    assert ImageTokenizerModule(**hp).hparams == module.hparams  # the stored settings rebuild the module


def test_every_key_a_resumed_run_may_change_is_in_the_config_tree():
    """RESUME_MAY_CHANGE names keys of the composed configs (a pattern that matches nothing, e.g. after a key is
    renamed or a table removed, would let the resume check compare what it should not, or nothing at all)."""
    from fnmatch import fnmatch

    from mmsuite.callbacks.run_state import RESUME_MAY_CHANGE, _flat

    keys: set[str] = set()
    for experiment in EXPERIMENTS:
        config = OmegaConf.to_container(_compose(f"experiment={experiment}"), resolve=True)
        keys |= set(_flat(config, config["paths"]))
    unmatched = [p for p in RESUME_MAY_CHANGE if not any(fnmatch(k, p) for k in keys)]
    assert not unmatched, f"RESUME_MAY_CHANGE patterns that match no key of any experiment: {unmatched}"
