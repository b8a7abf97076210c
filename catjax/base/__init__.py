"""The ground floor: error types and atomic file writes (`errors`), the argument
checks every floor shares (`checks`), lazily loaded public names (`lazy`)."""

from catjax.base.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(__name__, {}, modules=("checks", "errors", "lazy"))
