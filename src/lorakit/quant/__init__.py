"""QLoRA support: NF4/FP4 4-bit quantisation with double quantisation, in PyTorch (plus one
small C loop for dequantisation, compiled on first use when a C compiler is present; see ``native``).

Bit-compatible with bitsandbytes (same packed bytes, scales and state-dict keys), which is only a
test / benchmark reference and never imported here.
"""

from .codes import dynamic_map, get_code
from .convert import quantize_model
from .linear4bit import Linear4bit, RequantizationWarning, dequant_keep_budget, set_dequant_keep_budget
from .loading import load_4bit
from .nf4 import (
    block_scales,
    dequantize_4bit,
    dequantize_fp4,
    dequantize_nf4,
    quantize_4bit,
    quantize_fp4,
    quantize_nf4,
)
from .serialization import load_quantized, quantization_config, save_quantized
from .state import NestedState, QuantState

__all__ = [
    "Linear4bit",
    "NestedState",
    "QuantState",
    "RequantizationWarning",
    "block_scales",
    "dequant_keep_budget",
    "dequantize_4bit",
    "dequantize_fp4",
    "dequantize_nf4",
    "dynamic_map",
    "get_code",
    "load_4bit",
    "load_quantized",
    "quantization_config",
    "quantize_4bit",
    "quantize_fp4",
    "quantize_model",
    "quantize_nf4",
    "save_quantized",
    "set_dequant_keep_budget",
]
