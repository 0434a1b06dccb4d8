"""lorakit: LoRA fine-tuning for PyTorch — train, merge and serve PEFT-format adapters.

    import lorakit
    cfg = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    model = lorakit.get_lora_model(base_model, cfg)

    base_model = lorakit.load_base("smollm2-135m-instruct")          # a preset, folder or hub id (causal LM)
    tokenizer = lorakit.load_tokenizer("smollm2-135m-instruct")
    folder = lorakit.resolve_base("HuggingFaceTB/SmolLM2-135M")      # -> local checkpoint folder
"""

from lorakit.core.config import LoraConfig
from lorakit.core.model import LoraModel, get_lora_model
from lorakit.errors import AdapterError, AdapterLoadError, ConfigError, LorakitError, TargetModuleError

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
    "load_base",
    "load_tokenizer",
    "quantize_model",
    "resolve_base",
]

_LAZY = {  # these pull in more code (transformers, the quantiser); import them only when asked for
    "quantize_model": "lorakit.quant",
    "resolve_base": "lorakit.models",
    "load_base": "lorakit.train.presets",
    "load_tokenizer": "lorakit.train.presets",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
