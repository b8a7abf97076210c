"""catjax's own decoder through the block engine (`catjax.ptq.walk`).

    tokens ─ embed ─► X₀ (n windows × T × d)
    for block b:  stats_b ← site second moments of block b on X_b
                  T_b ← fit(stats_b, W_b)              (closed form; `catjax.ptq.blocks.fit_block`)
                  T_b ← train(T_b)                     (trained CAT, `catjax.ptq.train`)
                  (SpinQuant: T_b learned for the whole model before the walk, `catjax.ptq.spinquant`)
                  Ŵ_b ← quantize(T_b⁻ᵀ W_b)            (RTN | clip | GPTQ with H = T Σ Tᵀ)
                  X_{b+1} ← block_b(X_b), quantized or full precision (`Recipe.propagate`)

`DecoderBlocks` is the decoder's adapter: its stacked layers one block at a time,
run by a jitted block with an explicit site hook (the fast path; foreign models
reach the same walk through `catjax.ptq.foreign`). Peak memory beyond the
parameters: one block's statistics and the calibration activations
(`n · T · d` floats; twice that when training with quantized propagation, which
keeps the full-precision twin for the targets), never the statistics of all
blocks. With statistics given (`stats=`, e.g. from
`catjax.ptq.calibration.calibrate` or a saved file) and full-precision
propagation, a closed-form recipe needs no forward at all.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from catjax.models.llama import Llama, block_forward, layer_rope, rope_tables
from catjax.models.spec import spec_for
from catjax.models.sharding import shard_batch
from catjax.ptq import rounding, spinquant
from catjax.ptq.policy import Policy, layer_recipes, site_hook, site_state, stack_layers
from catjax.ptq.quantized import QuantizedModel
from catjax.ptq.blocks import fit_block, merge_block, quantize_block
from catjax.ptq.calibration import stats_hook
from catjax.core.stats import SecondMoment
from catjax.ptq.train import train_block
from catjax.ptq.walk import walk


@functools.partial(jax.jit, static_argnames=("graphdef", "hook"))
def _apply_block(graphdef, block, h, rope, hook, hook_state):
  h, _, outs = block_forward(graphdef, block, h, rope, hook=hook, hook_state=hook_state)
  return h, outs


class BlockRunner:
  """Runs one decoder block over the calibration activations in batches of windows."""

  def __init__(self, model: Llama, seqlen: int, batch_size: int, mesh=None):
    self.graphdef, _ = nnx.split(model.layers)
    self.mesh = mesh
    self.config = model.config
    self.tables = rope_tables(model.config, jnp.arange(seqlen)[None], model.dtype)
    self.batch_size = batch_size
    self.at(0)

  def at(self, layer: int) -> "BlockRunner":
    """Run the blocks as layer `layer` (its RoPE and attention window) from now on."""
    self.rope = layer_rope(self.config, self.tables, int(self.config.layer_kinds[layer]))
    return self

  def __call__(self, block: dict, x: jax.Array, *, hook=None, hook_state=None):
    """`(block(x), hook outputs)`; with `hook=stats_hook` the statistics accumulate over batches."""
    outs, state = [], hook_state
    for i in range(0, x.shape[0], self.batch_size):
      y, new = _apply_block(self.graphdef, block, shard_batch(x[i:i + self.batch_size], self.mesh),
                            self.rope, hook, state)
      outs.append(y)
      if hook is stats_hook:
        state = {site: new[site] for site in state}
    return jnp.concatenate(outs) if len(outs) > 1 else outs[0], state

  def statistics(self, block: dict, x: jax.Array, sites: dict[str, SecondMoment]):
    return self(block, x, hook=stats_hook, hook_state=sites)


def _check_windows(windows, cfg) -> np.ndarray:
  if windows is None:
    raise ValueError("this recipe walks the model block by block and needs calibration windows "
                     "(windows=None was given)")
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
    raise ValueError(f"windows.shape={windows.shape}; expected (n >= 1, seqlen >= 1)")
  if not np.issubdtype(windows.dtype, np.integer):
    raise ValueError(f"windows.dtype={windows.dtype}; expected integer token ids")
  if windows.min() < 0 or windows.max() >= cfg.vocab_size:
    raise ValueError(f"token ids in [{windows.min()}, {windows.max()}] outside the vocabulary "
                     f"[0, {cfg.vocab_size})")
  return windows.astype(np.int32)


def _same_keys(scales: list[dict]) -> bool:
  """Whether every block has per-channel scales for the same linears (FP4 kernels have none)."""
  return bool(scales[0]) and all(s.keys() == scales[0].keys() for s in scales)


def quantize_model(model: Llama, windows, recipe: Policy, *,
                   stats: dict[str, SecondMoment] | None = None, batch_size: int = 1,
                   progress: bool = True, mesh=None) -> QuantizedModel:
  """Quantize `model` with `recipe`, walking it one decoder block at a time.

  Args:
    model: the full-precision model (unchanged).
    windows: calibration token windows `(n, seqlen)`; may be None when
      `stats` is given and the recipe needs no walk (closed form, fp propagation).
    recipe: what each site gets, a per-site policy (`catjax.ptq.policy`; checked against the
      model's widths before any work): a `Recipe` for every site, or a
      `catjax.ptq.plan.Plan` (each site its own method, block size, bits and
      formats over the plan's base recipe).
    stats: precomputed statistics of every block (`catjax.ptq.calibration.calibrate` or
      `load_stats`); only with full-precision propagation.
    batch_size: windows per jitted block call.
    progress: a progress bar over the blocks.
    mesh: a `jax.sharding.Mesh` (`catjax.models.sharding`; the model placed on it with
      `shard_model`): each batch of windows splits over its data axis, and the
      statistics are reduced over it (a `batch_size` that the data axis
      divides uses every device); each block's site fits run concurrently on
      this process's devices of the mesh.

  Returns:
    A `QuantizedModel` (stacked transforms, merged fake-quantized kernels,
    weight scales; `info` has the seconds and, when training, the per-block losses).

  Raises:
    ValueError: a recipe that does not fit the model, bad windows, or `stats`
      with quantized propagation.
    FloatingPointError: naming the block and site of non-finite statistics.
  """
  cfg, policy = model.config, recipe
  policy.check_model(cfg)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
  spec = spec_for(cfg)
  per_layer = layer_recipes(policy, spec, cfg.num_layers)
  every = [r for rs in per_layer for r in rs.values()]
  if all(r.method == "fp" for r in every):
    return QuantizedModel(model, None, policy)
  base = policy.base
  quant_prop, train = base.propagates_quantized, base.train.steps > 0
  if stats is not None and quant_prop:
    raise ValueError(f"recipe {policy.label!r} propagates quantized outputs: its statistics "
                     "come from the quantized model and cannot be given (stats=...)")
  needs_stats = any(r.transform_method is not None or rounding.REGISTRY[r.weights].needs_stats
                    for r in every)
  walked = (needs_stats and stats is None) or quant_prop or train
  t_start = time.perf_counter()
  windows = _check_windows(windows, cfg) if walked else None
  given, extra = None, {}
  if train and any(r.transform is not None and r.transform.end_to_end for r in every):
    if policy.uniform is None:  # plans take closed-form methods only (`catjax.ptq.plan`)
      raise ValueError(f"learned end to end, {policy.label!r} needs one recipe for every site")
    given, extra["spinquant"] = spinquant.learn(model, windows, policy.uniform, progress=progress)
  adapter = DecoderBlocks(model, windows, policy, per_layer, stats=stats, batch_size=batch_size,
                          mesh=mesh, transforms=given)
  losses = walk(adapter, quantized_inputs=quant_prop, train=train and given is None,
                desc=f"quantize {policy.label}", progress=progress)
  info = {"seconds": time.perf_counter() - t_start, "walked": walked,
          "propagate": "quantized" if quant_prop else "fp", **extra}
  if losses:
    info["train"] = losses
  return adapter.result(info)


class DecoderBlocks:
  """catjax's own decoder as the block engine's adapter (`catjax.ptq.walk.BlockAdapter`):
  its stacked layers one block at a time, a jitted block with an explicit site hook,
  the calibration stream an `(n, T, d)` array (None without windows: statistics
  given or none needed)."""

  def __init__(self, model: Llama, windows: np.ndarray | None, policy: Policy,
               per_layer: list[dict], *, stats=None, batch_size: int = 1, mesh=None,
               transforms: list[dict] | None = None):
    self.cfg, self.policy, self.per_layer, self.stats = model.config, policy, per_layer, stats
    self.given = transforms  # per block, learned before the walk (not fitted)
    self.spec, self.mesh, self.base = spec_for(model.config), mesh, policy.base
    self.num_blocks = model.config.num_layers
    self.graphdef, state = nnx.split(model)
    self.state = state
    self.pure = nnx.to_pure_dict(state)
    self.runner = None if windows is None else BlockRunner(model, windows.shape[1], batch_size,
                                                           mesh)
    self.windows = windows
    self.embed = model.embed_tokens
    self.blocks, self.transforms, self.scales = [], [], []
    self._at = None

  def name(self, b: int) -> str:
    return f"block {b}"

  def block(self, b: int) -> dict:
    """Block b's float parameters (and the runner set to its layer)."""
    if self._at is None or self._at[0] != b:
      self._at = (b, jax.tree.map(lambda a: a[b], self.pure["layers"]))
      if self.runner is not None:
        self.runner.at(b)
    return self._at[1]

  def inputs(self):
    return None if self.windows is None else self.embed(jnp.asarray(self.windows))

  def calibrate(self, b, x, *, outputs):
    block = self.block(b)
    if x is None:
      return None, None if self.stats is None else jax.tree.map(lambda a: a[b], self.stats)
    if self.stats is not None:
      return self.runner(block, x)[0], jax.tree.map(lambda a: a[b], self.stats)
    empty = {site: SecondMoment.zeros(d, dtype=jnp.float32)
             for site, d in self.spec.site_dims(self.cfg).items()}
    return self.runner.statistics(block, x, empty)

  def run(self, b, x):
    if len(self.blocks) <= b:  # the float block
      return self.runner(self.block(b), x)[0]
    recipes = self.per_layer[b]
    hook = site_hook([recipes], self.spec, kv_config=self.base.kv_config)
    state = site_state([self.transforms[b]], [recipes], self.spec)
    state = None if state is None else jax.tree.map(lambda a: a[0], state)
    return self.runner(self.blocks[b], x, hook=hook, hook_state=state)[0]

  def fit(self, b, stats):
    if self.given is not None:
      return self.given[b]
    block, recipes = self.block(b), self.per_layer[b]
    # Under a mesh the fits' factorizations would run replicated on every device:
    # each site's fit runs once, from host copies, spread over this process's devices.
    if self.mesh is None:
      return fit_block(block, stats, recipes, spec=self.spec, layer=b)
    return fit_block(*jax.device_get((block, stats)), recipes, spec=self.spec, layer=b,
                     devices=list(self.mesh.local_devices))

  def train(self, b, transforms, x, target):
    return train_block(self.runner, self.block(b), transforms, x, target, self.base,
                       spec=self.spec, layer=b)

  def quantize(self, b, transforms, stats, w_clip):
    block = self.block(b)
    qblock, scales = quantize_block(merge_block(block, transforms, spec=self.spec),
                                    self.per_layer[b], spec=self.spec, transforms=transforms,
                                    stats=stats, w_clip=w_clip)
    self.blocks.append(qblock)
    self.transforms.append(transforms)
    self.scales.append(scales)
    return True

  def result(self, info: dict) -> QuantizedModel:
    """The quantized model, once every block is quantized."""
    self.pure["layers"] = stack_layers(self.blocks)
    state = jax.tree.map(lambda a: a, self.state)
    nnx.replace_by_pure_dict(state, self.pure)
    w_scales = stack_layers(self.scales) if _same_keys(self.scales) else None
    return QuantizedModel(nnx.merge(self.graphdef, state),
                          site_state(self.transforms, self.per_layer, self.spec), self.policy,
                          w_scales=w_scales, info=info)
