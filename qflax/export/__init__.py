"""After training: export a quantized model to integers, save / load it, rebuild it, run it on integers.

An :class:`IntegerModel` holds one or more variants of one network (a switchable network's
bit-widths share one file): per variant and quantized layer the packed weight codes with
their scale and zero point, the activation quantizer's name, bits and slot parameters, and
float32 biases and BatchNorm (the variant's slot, unfolded). Identical arrays are stored
once across variants.

Example:
  >>> from qflax import export, models, nn as qnn
  >>> plans = {f"w{b}a{b}": qnn.uniform_plan(model.num_blocks, b, spec.bit_set) for b in (32, 4, 2)}
  >>> im = export.integer_model(model, variables, plans, model_name="resnet20", num_classes=10,
  ...                           spec=spec, input_shape=(32, 32, 3))
  >>> export.save("resnet20.qfx", im)
  >>> im = export.load("resnet20.qfx")
  >>> model, variables, plan = export.rebuild(im, "w4a4")       # float forward, exact logits
  >>> logits = export.integer_logits(im, "w4a4", images)        # int8 operands, int32 sums
"""

from qflax.export._src.build import integer_model
from qflax.export._src.fileformat import from_bytes
from qflax.export._src.fileformat import load
from qflax.export._src.fileformat import save
from qflax.export._src.fileformat import to_bytes
from qflax.export._src.inference import ACCUMULATOR_LIMIT
from qflax.export._src.inference import LayerError
from qflax.export._src.inference import integer_forward
from qflax.export._src.inference import integer_layers
from qflax.export._src.inference import integer_logits
from qflax.export._src.inference import layer_errors
from qflax.export._src.rebuild import float_parameter_bytes
from qflax.export._src.rebuild import rebuild
from qflax.export._src.types import Activation
from qflax.export._src.types import ExportFileError
from qflax.export._src.types import IntegerModel
from qflax.export._src.types import LinearLayer
from qflax.export._src.types import NormLayer
from qflax.export._src.types import PackedCodes
from qflax.export._src.types import Variant
