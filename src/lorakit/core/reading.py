"""Reading a PEFT-format adapter folder into an :class:`~lorakit.core.adapter_weights.AdapterWeights`.

Separate from the type itself because it needs the variants' config classes (AdaLoRA's), which
sit above :mod:`lorakit.core.adapter_weights` in the import order.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lorakit.core.adapter_weights import AdapterWeights
from lorakit.core.variants import config_class_for_peft_type
from lorakit.errors import AdapterLoadError, ConfigError
from lorakit.io import read_adapter_folder


def read_adapter_weights(folder: str | Path, root: str | Path | None = None) -> AdapterWeights:
    """Read a PEFT-format adapter folder (LoRA or AdaLoRA, PEFT's or lorakit's).

    Args:
        folder: adapter_config.json + adapter_model.safetensors (or a legacy .bin, never unpickled).
        root: read only files inside this folder, as ``LoraModel.load_adapter`` does.

    Raises AdapterLoadError for a missing, corrupt or inconsistent folder.
    """
    raw, tensors = read_adapter_folder(folder, root=root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown PEFT keys: LoraModel warns when it loads them
            config = config_class_for_peft_type(raw.get("peft_type", "LORA")).from_dict(raw)
        return AdapterWeights.from_peft_state_dict(tensors, config, raw, source=Path(folder))
    except (ConfigError, TypeError, ValueError) as exc:
        raise AdapterLoadError(f"{folder}: {exc}") from None
