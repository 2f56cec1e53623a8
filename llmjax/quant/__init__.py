"""Weight-only quantization: group-wise int4 and per-channel int8, as data that flows through the model.

`weights.py` holds the `QuantizedWeight` pytree, the schemes (`int4-g128`, `int4-g64`, `int4-g32`, each
optionally `-asym`, and `int8`), the paired `quantize`/`dequantize` functions and the int4 packing
(documented there: why eight codes per uint32 word, interleaved within each group). `tree.py` works on
a whole model's weights: quantize or dequantize a tree or `Params`, the checkpoint storage form, the
check that a tensor-parallel split keeps whole groups. The products live in `llmjax.kernels`
(`linear.py` dispatches; `int4_matmul.py` holds the Pallas kernels).

Quantization happens at conversion (`llmjax convert --quant int4-g128`), never at load.
"""

from llmjax.quant.tree import dequantize_params, quantize_params
from llmjax.quant.weights import (SCHEMES, QuantizedWeight, QuantScheme, dequantize, dequantize_int4,
                                  dequantize_int8, is_quantized, quantize, quantize_int4, quantize_int8)

__all__ = ["SCHEMES", "QuantScheme", "QuantizedWeight", "dequantize", "dequantize_int4", "dequantize_int8",
           "dequantize_params", "is_quantized", "quantize", "quantize_int4", "quantize_int8",
           "quantize_params"]
