"""`transformers`, imported for its tokenizers without the notice that PyTorch
is missing."""

import logging


class _NoTorchNotice(logging.Filter):
  """Drops transformers' "PyTorch was not found" notice (catjax uses only its tokenizers)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


def import_transformers():
  """The `transformers` module, imported without its "PyTorch was not found"
  notice; its other messages are kept."""
  logger = logging.getLogger("transformers")
  if not any(isinstance(f, _NoTorchNotice) for f in logger.filters):
    logger.addFilter(_NoTorchNotice())
  import transformers
  return transformers
