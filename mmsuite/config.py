"""The settings classes as Hydra config schemas, and the check of a composed config against them.

Every option of the ``model``, ``data`` and ``schedule`` groups starts from its settings class, registered here in
Hydra's ConfigStore as ``<option>_schema`` (``conf/model/dynamics.yaml`` opens with ``defaults: [dynamics_schema,
_self_]``). So the composed config holds every setting with its one default (from the dataclass), the YAML files
state only what differs, any key can be overridden on the command line, and a misspelled key or a value of the
wrong type stops the composition with the key's full name. :func:`check_settings` then builds the settings
objects themselves (:func:`mmsuite.settings.parse`), which adds what composition cannot see: bounds and rules
between fields, and keys added with ``+``. ``mmsuite.run`` imports this module, so the schemas are registered
before Hydra composes anything.
"""

from __future__ import annotations

from dataclasses import make_dataclass

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import DictConfig

from mmsuite.datamodules.clips import FramesDataModule
from mmsuite.datamodules.dynamics import DynamicsLatentDataModule
from mmsuite.datamodules.fvlm import FVLMDataModule
from mmsuite.datamodules.m4 import M4PoseDataModule
from mmsuite.datamodules.mmpt import MMPTDataModule
from mmsuite.datamodules.nano4m import Nano4MDataModule
from mmsuite.datamodules.sounds import ToySoundDataModule
from mmsuite.lightning_modules.audio_tokenizer import AudioTokenizerModule
from mmsuite.lightning_modules.dynamics.module import DynamicsModule
from mmsuite.lightning_modules.fourm.module import FourMModule
from mmsuite.lightning_modules.fvlm.module import FVLMModule
from mmsuite.lightning_modules.image_tokenizer import ImageTokenizerModule
from mmsuite.lightning_modules.mmpt.module import MMPTModule
from mmsuite.nn.schedule import StepSchedule, TokenSchedule
from mmsuite.settings import parse

# group -> {option (conf/<group>/<option>.yaml): the class it instantiates}
TARGETS = {
    "model": {
        "image_tokenizer": ImageTokenizerModule,
        "audio_tokenizer": AudioTokenizerModule,
        "fourm": FourMModule,
        "dynamics": DynamicsModule,
        "mmpt": MMPTModule,
        "fvlm": FVLMModule,
    },
    "data": {
        "toyworld_frames": FramesDataModule,
        "toysound": ToySoundDataModule,
        "m4_pose": M4PoseDataModule,
        "nano4m": Nano4MDataModule,
        "dynamics_latents": DynamicsLatentDataModule,
        "mmpt": MMPTDataModule,
        "fvlm_clips": FVLMDataModule,
    },
}
SCHEDULES = {"cosine": StepSchedule, "tokens": TokenSchedule}
CHECKED_GROUPS = ("model", "data")


def _with_target(cls: type) -> type:
    """``cls.Settings`` plus the ``_target_`` Hydra instantiates (``cls``)."""
    target = f"{cls.__module__}.{cls.__qualname__}"
    return make_dataclass(f"{cls.__name__}Config", [("_target_", str, target)], bases=(cls.Settings,))


def register_schemas() -> None:
    store = ConfigStore.instance()
    for group, options in TARGETS.items():
        for option, cls in options.items():
            store.store(group=group, name=f"{option}_schema", node=_with_target(cls))
    for option, schema in SCHEDULES.items():
        store.store(group="schedule", name=f"{option}_schema", node=schema)


def check_settings(cfg: DictConfig, groups: tuple[str, ...] = CHECKED_GROUPS) -> None:
    """Build the settings of ``cfg.model`` and ``cfg.data`` (the classes their ``_target_`` names): an unknown key, a
    wrong type or an invalid value stops here, naming the key, before anything is built or written."""
    for group in groups:
        node = cfg.get(group)
        if node is None or "_target_" not in node:
            continue
        settings = getattr(get_class(node._target_), "Settings", None)
        if settings is not None:
            parse(settings, node, group)


register_schemas()
