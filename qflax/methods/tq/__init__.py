"""Transform quantization (Young, Wang, Taubman, Girod, TPAMI 2021): post-training
rate-distortion compression of a trained model's weights.

``transforms`` (``W = S T``; KLT, ELT, identity), ``allocation`` (blocks, step
search, Lagrangian bit allocation), ``compress`` (a whole Flax model: analysis,
quantization at a rate, reconstruction, transform-domain inference), ``codec``
(the compressed model file).
"""

from qflax.methods.tq import allocation, codec, compress, transforms
from qflax.methods.tq.codec import CompressedFileError
from qflax.methods.tq.compress import (analyse, frontier, quantize_layers, reconstruct, transform_domain)
from qflax.methods.tq.transforms import Factorisation, elt_basis, factorise, klt_basis

__all__ = ["CompressedFileError", "Factorisation", "allocation", "analyse", "codec", "compress", "elt_basis",
           "factorise", "frontier", "klt_basis", "quantize_layers", "reconstruct", "transform_domain",
           "transforms"]
