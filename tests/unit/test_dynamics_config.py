"""The dynamics family's config: settings removed from it are refused with an error naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import mmsuite.run  # noqa: F401  (registers the config resolvers)
from mmsuite.config import check_settings
from mmsuite.settings import SettingsError

CONF = Path(__file__).resolve().parents[2] / "conf"

# settings that no longer exist: a run that still names one must stop, not run without it
REMOVED = [
    "model.net.velocity_learned=false",
    "model.noise.prefix_share=0.5",
    "model.noise.pattern_context=16",
    "model.noise.velocity_drop=0.5",
    "model.noise.own_context=0.25",
    "model.noise.own_context_steps=4",
    "model.noise.own_context_start=1000",
    "model.loss.decoded=60",
    "model.loss.decoded_frames=16",
    "model.loss.decoded_floor=0.001",
    # the design now, not options: the prior's guess, the scaled input skip, held context on every kind of row
    "model.net.prior=none",
    "model.net.input_skip=true",
    "model.net.input_skip_scale=true",
    "model.net.input_skip_var=0.003",
    "model.noise.pattern=interleave",
    "model.noise.pattern=rising",
    "model.noise.pattern=prefix",
    "model.noise.pattern_fraction=0.5",
    "model.noise.pattern_period=3",
    # measured not to help on the controllable world
    "model.net.copy_mask=true",
    "model.net.velocity=true",
    "model.net.velocity_init=0.5",
    "model.net.fixed_clean_gate_from=32",
    "model.noise.clean_prior=true",
    "model.rollout.clean_prior=true",
    "model.rollout.velocity=observed",
]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("override", REMOVED)
def test_removed_dynamics_settings_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
        _compose("experiment=dynamics_shortcut", override)
    with pytest.raises(SettingsError, match=rf"^{key.replace('.', chr(92) + '.')}: unknown setting"):
        check_settings(_compose("experiment=dynamics_shortcut", "+" + override))  # '+' slips past composition


@pytest.mark.parametrize("key", ["tokenizer.latent_bound", "tokenizer.latent_noise"])
def test_removed_tokenizer_settings_are_refused(key):
    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
        _compose("experiment=image_tokenizer", "tokenizer=continuous", f"{key}=0.1")
    model_key = {"tokenizer.latent_bound": "model.net.latent_bound", "tokenizer.latent_noise": "model.latent_noise"}[
        key
    ]
    with pytest.raises(SettingsError, match=rf"^{model_key.replace('.', chr(92) + '.')}: unknown setting"):
        check_settings(_compose("experiment=image_tokenizer", "tokenizer=continuous", f"+{model_key}=0.1"))


def test_the_model_config_states_only_what_comes_from_elsewhere():
    """conf/model/dynamics.yaml sets no option of its own (every option an experiment uses is set there, the rest
    keep their defaults): each leaf is an interpolation, and each is a setting the experiments compose and check."""
    import yaml

    raw = yaml.safe_load((CONF / "model" / "dynamics.yaml").read_text())

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            elif k != "defaults":
                yield f"{prefix}{k}", v

    found = dict(leaves(raw))
    assert found and all(isinstance(v, str) and v.startswith("${") for v in found.values()), found
    for experiment in ("dynamics", "dynamics_shortcut"):
        check_settings(_compose(f"experiment={experiment}", "paths.run_dir=run"))  # every key known and valid
