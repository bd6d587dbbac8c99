"""The ucf101 config's data path on TFDS mock data.

TFDS registers ``ucf101`` only when TensorFlow is installed, which CI does not
install (600 MB), so this test is skipped there; run it where TensorFlow is
present. The model and the image size are shrunk so that the run takes a minute on CPU;
everything else (dataset, 8-frame clips, method, bits) is the shipped config.
"""

import pytest

pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from qflax import train  # noqa: E402


def test_ucf101_config_trains_on_mock_clips(tmp_path):
  c = train.load_config_file(str(__import__("pathlib").Path(__file__).parents[2] / "configs" / "aao_ucf101.py"))
  train.validate(c)
  c.model.name = "tsm_resnet8"
  c.model.options = {"num_frames": c.dataset.num_frames, "width": 0.25}
  c.dataset.image_size, c.dataset.resize_size = 32, 36
  c.batch_size = c.eval_batch_size = 2
  c.num_epochs, c.num_devices, c.dataset.num_workers = 1, 1, 2
  with tfds.testing.mock_data(num_examples=4):
    result = train.train_and_evaluate(c, str(tmp_path))
  assert [v["name"] for v in result["variants"]][0] == "fp32"
  assert result["epochs"] == 1
