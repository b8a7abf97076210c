"""The application: assets, data, the pipeline behind the CLI, tables, plots,
method specs, runnable models, lm-eval. Names load on first use (`lmeval`
needs the optional extra)."""

from catjax.base.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(__name__, {
    "RunConfig": ".pipeline", "run": ".pipeline", "write_outputs": ".pipeline",
    "comparisons_markdown": ".pipeline", "comparison_markdown": ".tables",
    "markdown_table": ".tables", "parse_spec": ".specs", "text_windows": ".data",
    "wiki_documents": ".data", "load_pretrained": ".runnable", "load_runnable": ".runnable",
    "plan_points": ".plots", "plot_predicted_vs_measured": ".plots",
}, modules=("assets", "lmeval"))
