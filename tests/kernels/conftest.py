"""The Triton kernels run here on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before ``lorakit.kernels.nf4`` / ``lora`` are imported: ``@triton.jit``
decides at decoration time whether a kernel is interpreted. Only these tests import those modules.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
