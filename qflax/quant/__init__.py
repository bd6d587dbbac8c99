"""Pure-JAX quantizers with straight-through estimators (no Flax needed).

Every quantizer takes ``bits`` as data (a Python int or a traced ``int32``
array); ``bits >= 32`` is the identity, so changing the bit-width under ``jit``
never recompiles. Each has an integer form, an :class:`IntegerTensor` whose
:func:`dequantize` equals the fake-quantized tensor exactly.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from qflax import quant
  >>> w = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
  >>> wq = quant.dorefa_weight(w, bits=4)
  >>> codes = quant.dorefa_weight_integer(w, 4)
  >>> bool((quant.dequantize(codes) == wq).all())
  True
"""

from qflax.quant._src.bits import FULL_PRECISION
from qflax.quant._src.bits import MAX_BITS
from qflax.quant._src.bits import check_bits
from qflax.quant._src.bits import is_full_precision
from qflax.quant._src.dorefa import clamp_activation
from qflax.quant._src.dorefa import clamp_activation_integer
from qflax.quant._src.dorefa import dorefa_weight
from qflax.quant._src.dorefa import dorefa_weight_integer
from qflax.quant._src.hwgq import hwgq
from qflax.quant._src.hwgq import hwgq_integer
from qflax.quant._src.hwgq import hwgq_step
from qflax.quant._src.hwgq import hwgq_steps
from qflax.quant._src.integer import IntegerTensor
from qflax.quant._src.integer import dequantize
from qflax.quant._src.integer import pack_codes
from qflax.quant._src.integer import packed_size_bytes
from qflax.quant._src.integer import unpack_codes
from qflax.quant._src.lsq import lsq
from qflax.quant._src.lsq import lsq_init_step
from qflax.quant._src.lsq import lsq_integer
from qflax.quant._src.midtread import midtread
from qflax.quant._src.midtread import midtread_integer
from qflax.quant._src.pact import pact
from qflax.quant._src.pact import pact_init_alpha
from qflax.quant._src.pact import pact_integer
from qflax.quant._src.qil import qil
from qflax.quant._src.qil import qil_init_activation
from qflax.quant._src.qil import qil_init_weight
from qflax.quant._src.qil import qil_integer
from qflax.quant._src.qil import qil_interval
from qflax.quant._src.registry import Quantizer
from qflax.quant._src.registry import get_quantizer
from qflax.quant._src.registry import quantizer_names
from qflax.quant._src.sat import sat_weight
from qflax.quant._src.sat import sat_weight_integer
from qflax.quant._src.stats import code_statistics
from qflax.quant._src.ste import round_ste
from qflax.quant._src.ste import straight_through
from qflax.quant._src.uniform import calibrate_asymmetric
from qflax.quant._src.uniform import calibrate_symmetric
from qflax.quant._src.uniform import uniform_asymmetric
from qflax.quant._src.uniform import uniform_asymmetric_integer
from qflax.quant._src.uniform import uniform_symmetric
from qflax.quant._src.uniform import uniform_symmetric_integer
from qflax.quant._src.uniform import uniform_unsigned
from qflax.quant._src.uniform import uniform_unsigned_integer
