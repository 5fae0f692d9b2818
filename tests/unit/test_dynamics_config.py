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

# options measured not to help, removed with their code: a run that still names one must stop, not run without it
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


@pytest.mark.parametrize("pattern", ["rising", "prefix"])
def test_removed_noise_patterns_are_refused(pattern):
    with pytest.raises(SettingsError, match=r"^model\.noise\.pattern"):
        check_settings(_compose("experiment=dynamics_shortcut", f"model.noise.pattern={pattern}"))


@pytest.mark.parametrize("key", ["tokenizer.latent_bound", "tokenizer.latent_noise"])
def test_removed_tokenizer_settings_are_refused(key):
    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
        _compose("experiment=image_tokenizer", "tokenizer=continuous", f"{key}=0.1")
    model_key = {"tokenizer.latent_bound": "model.net.latent_bound", "tokenizer.latent_noise": "model.latent_noise"}[
        key
    ]
    with pytest.raises(SettingsError, match=rf"^{model_key.replace('.', chr(92) + '.')}: unknown setting"):
        check_settings(_compose("experiment=image_tokenizer", "tokenizer=continuous", f"+{model_key}=0.1"))
