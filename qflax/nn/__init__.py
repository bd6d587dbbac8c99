"""Flax Linen layers for quantized networks whose precision is chosen at call time.

Example:
  >>> from qflax import nn as qnn
  >>> conv = qnn.QuantConv(16, (3, 3), weight_quantizer="sat", act_quantizer="pact",
  ...                      bit_set=(32, 4, 2))
  >>> plan = qnn.uniform_plan(1, 4, bit_set=(32, 4, 2))
  >>> variables = conv.init(jax.random.key(0), x, plan.block(0))
  >>> y = conv.apply(variables, x, plan.block(0))
"""

from qflax.nn._src.batch_norm import SwitchableBatchNorm
from qflax.nn._src.batch_norm import select_slot
from qflax.nn._src.batch_norm import update_slot
from qflax.nn._src.calibration import calibrate
from qflax.nn._src.layers import CALIBRATION
from qflax.nn._src.layers import COMPUTE_DTYPES
from qflax.nn._src.layers import EXPORT
from qflax.nn._src.layers import FLOPS
from qflax.nn._src.layers import QUANT_STATS
from qflax.nn._src.layers import QuantConv
from qflax.nn._src.layers import compute_dtype
from qflax.nn._src.layers import conv_padding
from qflax.nn._src.layers import QuantDense
from qflax.nn._src.layers import export_kernel
from qflax.nn._src.layers import exported_bytes
from qflax.nn._src.layers import exported_kernel_params
from qflax.nn._src.layers import quantize_operands
from qflax.nn._src.layers import quantized_product
from qflax.nn._src.layers import quantizer_param
from qflax.nn._src.layers import quantizer_statistics
from qflax.nn._src.precision import BlockPrecision
from qflax.nn._src.precision import PrecisionPlan
from qflax.nn._src.precision import block_plan
from qflax.nn._src.precision import check_bit_set
from qflax.nn._src.precision import check_slot
from qflax.nn._src.precision import make_plan
from qflax.nn._src.precision import mix_plans
from qflax.nn._src.precision import parse_precision
from qflax.nn._src.precision import precision_name
from qflax.nn._src.precision import uniform_plan
