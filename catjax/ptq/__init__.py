"""Post-training quantization: recipes and plans (one per-site policy), their typed
configs, calibration, the per-block algorithms, the site hook, the block engine,
trained CAT, realization and the planner. Names load on first use."""

from catjax.base.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(__name__, {
    "Recipe": ".recipe", "ptq_methods": ".recipe",
    "GPTQConfig": ".configs", "TrainConfig": ".configs", "SmoothQuantConfig": ".configs",
    "Plan": ".plan", "SitePlan": ".plan", "uniform_plan": ".plan",
    "calibrate": ".calibration", "quantize_model": ".engine", "QuantizedModel": ".quantized",
    "realize": ".realization", "linear_bytes": ".realization", "SiteHook": ".hooks",
    "Rule": ".rules", "quantize": ".foreign", "find_linears": ".foreign",
    "site_grams": ".blocks",
}, modules=("planner", "rounding", "qwix_interop"))
