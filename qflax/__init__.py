"""qflax: quantized convolutional networks with knowledge distillation in JAX/Flax."""

__version__ = "0.1.0"


def load(workdir: str, *, checkpoint: str = "latest"):
  """The method and trained state of the run in ``workdir`` (see ``qflax.train.saved``).

  Example:
    >>> run = qflax.load("runs/quickstart")
    >>> logits = run.predict(images, "w4a4")
  """
  from qflax.train import saved   # imported here: ``import qflax`` stays light (qflax.quant needs no Flax)
  return saved.load(workdir, checkpoint=checkpoint)
