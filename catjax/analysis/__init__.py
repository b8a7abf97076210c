"""Measuring quantized models: perplexity and token NLLs, per-site SQNR reports,
layer-level method comparisons. Names load on first use."""

from catjax.base.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(__name__, {
    "perplexity": ".evaluate", "window_nll": ".evaluate", "token_nll": ".evaluate",
    "site_report": ".sites", "foreign_site_report": ".sites", "SiteSQNR": ".sites",
    "summary_row": ".sites",
    "compare_methods": ".layers", "markdown_table": ".layers",
})
