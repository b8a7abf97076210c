"""Weight rounding methods: how a merged kernel is put on its grid (`Recipe.weights`).

A method is one module here that defines `METHOD = WeightMethod(...)`
(`catjax.ptq.rounding.base`): its name, a one-line summary, its `quantize`
function and what it needs and takes; registering it is its line in `REGISTRY`.
Everything else (the `Recipe` checks, the method spec option `@name`, the
CLI's `--weights` choices, the engine's walk) reads the registry.
"""

from catjax.ptq.rounding import clip, gptq, rtn
from catjax.ptq.rounding.base import WeightMethod, channel_clipped_quantize, round_to_grid

REGISTRY: dict[str, WeightMethod] = {m.name: m for m in (
    rtn.METHOD,
    clip.METHOD,
    gptq.METHOD,
)}
NAMES = tuple(REGISTRY)

__all__ = ["REGISTRY", "NAMES", "WeightMethod", "channel_clipped_quantize", "round_to_grid"]
