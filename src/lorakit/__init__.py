"""lorakit: LoRA fine-tuning for PyTorch — train, merge and serve PEFT-format adapters.

    import lorakit
    cfg = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    model = lorakit.get_lora_model(base_model, cfg)
"""

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, AdapterLoadError, ConfigError, LorakitError, TargetModuleError
from lorakit.model import LoraModel, get_lora_model

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "AdapterLoadError",
    "ConfigError",
    "LoraConfig",
    "LoraModel",
    "LorakitError",
    "TargetModuleError",
    "get_lora_model",
    "quantize_model",
]


def __getattr__(name: str):
    # quant pulls in more code; import it only when asked for
    if name == "quantize_model":
        from lorakit.quant import quantize_model

        return quantize_model
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
