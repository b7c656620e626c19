"""What generate.py and merge.py share about their flags: which base an adapter runs on
(``--model``, by default the base the adapter records, checked against it by config before
any weights are built) and, for a preset, the seed its random base was built with (the
training ``--seed`` that train.py records beside the adapter).
"""
import json
import re
from pathlib import Path
from typing import Callable, Optional, Union

from lorakernels.adapters import ADAPTER_CONFIG_FILE, recorded_base_model
from model.build import base_differences
from model.config import PRESETS

DEFAULT_MODEL = "phi3-tiny"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_base_model(model: Optional[str], adapter: Optional[Union[str, Path]],
                       allow_mismatch: bool = False, log: Callable[[str], None] = print) -> str:
    """The base ``adapter`` runs on, from --model: by default the base it records (a preset,
    a directory here or a hub id); a given --model whose architecture differs from that base
    is refused, naming both, before any weights are built (``allow_mismatch``: a note
    instead)."""
    recorded = recorded_base_model(adapter) if adapter is not None else None
    where = f"{Path(adapter) / ADAPTER_CONFIG_FILE}" if adapter is not None else ""
    if model is None:
        return default_base(recorded, where, log)
    if recorded is None:
        return model
    differences = base_differences(model, recorded)
    if differences is None:
        log(f"note: {where} records base {recorded}, whose config.json is not here: "
            f"--model {model} cannot be checked against it")
    elif differences and not allow_mismatch:
        raise ValueError(f"--model {model} is not the base the adapter was trained on: {where} "
                         f"records {recorded} ({'; '.join(differences[:3])}); pass --model "
                         f"{recorded}, or --allow-base-mismatch to use {model} anyway")
    elif differences:
        log(f"note: --allow-base-mismatch: using --model {model}, not the recorded {recorded}")
    return model


def default_base(recorded: Optional[str], where: str, log: Callable[[str], None]) -> str:
    """The recorded base when it can be loaded from here; phi3-tiny when none is recorded."""
    if recorded is None:
        if where:
            log(f"note: {where} records no base model: using {DEFAULT_MODEL} (pass --model)")
        return DEFAULT_MODEL
    if recorded in PRESETS or Path(recorded).expanduser().is_dir() or HUB_ID.fullmatch(recorded):
        return recorded
    raise ValueError(f"{where} records base {recorded}, which is not a preset, a directory "
                     f"here or a hub id: pass --model")



DEFAULT_SEED = 42
TRAINER_STATE = "trainer_state.json"  # train.py writes it into every checkpoint, final/ included


def preset_seed(model: str, adapter: Optional[Union[str, Path]], seed: Optional[int]) -> int:
    """The seed to rebuild a preset's random base: ``seed`` when given, else the training seed
    recorded in the adapter's directory (a different seed is a different base), else 42."""
    if seed is not None:
        return seed
    state = Path(adapter) / TRAINER_STATE if adapter is not None else None
    if model in PRESETS and state is not None and state.is_file():
        try:
            return int(json.loads(state.read_text())["config"]["seed"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{state}: no training seed recorded (damaged?); pass "
                             "--seed") from None
    return DEFAULT_SEED
