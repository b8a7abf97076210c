"""Files catjax writes and reads back: statistics files and verified quantized
checkpoints (docs/formats.md). Names load on first use."""

from catjax.base.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(__name__, {
    "save_stats": ".stats_file", "load_stats": ".stats_file",
    "save_quantized": ".checkpoint", "load_quantized": ".checkpoint",
    "CheckpointError": ".checkpoint", "save_foreign": ".foreign", "load_foreign": ".foreign",
})
