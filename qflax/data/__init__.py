"""Data sources and input pipelines (independent of models).

Small datasets load into memory (:func:`load_dataset`) and are batched on the
devices (:class:`DeviceBatches`); large image and video datasets stream through
:class:`StreamingPipeline`, built on grain (:class:`StreamedBatches`). Augmentation
(:func:`augment`) and normalisation (:func:`normalize`) run inside the jitted step.
"""

from qflax.data.batches import DeviceBatches
from qflax.data.batches import StreamedBatches
from qflax.data.device import DeviceSplit
from qflax.data.device import augment
from qflax.data.device import epoch_permutation
from qflax.data.device import normalize
from qflax.data.device import to_device
from qflax.data.idx import IdxFormatError
from qflax.data.idx import load_idx_split
from qflax.data.idx import read_idx
from qflax.data.idx import write_idx
from qflax.data.sources import KNOWN
from qflax.data.sources import Augmentation
from qflax.data.sources import DataUnavailableError
from qflax.data.sources import Dataset
from qflax.data.sources import DatasetInfo
from qflax.data.sources import Split
from qflax.data.sources import StreamSource
from qflax.data.sources import dataset_names
from qflax.data.sources import is_known_dataset
from qflax.data.sources import is_streamed
from qflax.data.sources import load_dataset
from qflax.data.sources import open_stream
from qflax.data.streaming import StreamingPipeline
from qflax.data.streaming import random_resized_crop
from qflax.data.streaming import resize_center_crop
from qflax.data.synthetic import synthetic_images
