"""A small NNX decoder catjax did not write, for the rule path's tests: q/k/v and o as
einsum modules with N-D weights, an MLP of nnx.Linear, outlier channels in the
attention norm."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

D, HEADS, HD, F = 32, 4, 8, 48


class Einsum(nnx.Module):
  def __init__(self, eq, shape, rngs):
    self.eq = eq
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.3)

  def __call__(self, x):
    return jnp.einsum(self.eq, x, self.w[...])


def block_math(b, h):
  """One block's computation over its submodules (`Block`'s, and the Linen twin's)."""
  x = b.norm(h)
  q, k, v = b.q(x), b.k(x), b.v(x)
  t = h.shape[1]
  s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(HD)
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
  h = h + b.o(jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v))
  x = b.mlp_norm(h)
  return h + b.down(jax.nn.silu(b.gate(x)) * b.up(x))


class Block(nnx.Module):
  """q/k/v as (D, N, H) einsums reading one normed input, o as NH,NHD->D, an MLP of
  nnx.Linear (gate/up share an input), with outlier channels in the norm scales."""

  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(D, rngs=rngs)
    self.norm.scale[...] = jnp.ones(D).at[jnp.array([3, 17])].set(12.0)
    self.q = Einsum("btd,dnh->btnh", (D, HEADS, HD), rngs)
    self.k = Einsum("btd,dnh->btnh", (D, HEADS, HD), rngs)
    self.v = Einsum("btd,dnh->btnh", (D, HEADS, HD), rngs)
    self.o = Einsum("btnh,nhd->btd", (HEADS, HD, D), rngs)
    self.mlp_norm = nnx.RMSNorm(D, rngs=rngs)
    self.gate = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(D, F, use_bias=True, rngs=rngs)
    self.down = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, h):
    return block_math(self, h)


class Net(nnx.Module):
  def __init__(self, seed=0, layers=2):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(64, D, rngs=rngs)
    self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
    self.head = nnx.Linear(D, 64, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    for b in self.blocks:
      h = b(h)
    return self.head(h)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 16)), jnp.int32)
CALIB = [TOKENS[i:i + 1] for i in range(4)]


def linen_net(layers=2):
  """`Net` written in Linen (Flax's older API), with the same math and parameter names;
  `linen_params(net)` gives it an NNX `Net`'s weights."""
  from flax import linen as nn

  class LinenEinsum(nn.Module):
    eq: str
    shape: tuple

    @nn.compact
    def __call__(self, x):
      return jnp.einsum(self.eq, x, self.param("w", nn.initializers.normal(0.3), self.shape))

  class LinenBlock(nn.Module):
    def setup(self):
      self.norm, self.mlp_norm = nn.RMSNorm(), nn.RMSNorm()
      self.q, self.k, self.v = (LinenEinsum("btd,dnh->btnh", (D, HEADS, HD)) for _ in range(3))
      self.o = LinenEinsum("btnh,nhd->btd", (HEADS, HD, D))
      self.gate, self.up, self.down = nn.Dense(F, use_bias=False), nn.Dense(F), nn.Dense(D, use_bias=False)

    def __call__(self, h):
      return block_math(self, h)

  class LinenNet(nn.Module):
    def setup(self):
      self.embed = nn.Embed(64, D)
      self.blocks = [LinenBlock() for _ in range(layers)]
      self.head = nn.Dense(64)

    def __call__(self, tokens):
      h = self.embed(tokens)
      for b in self.blocks:
        h = b(h)
      return self.head(h)

  return LinenNet()


def linen_params(net: Net) -> dict:
  """An NNX `Net`'s weights as `linen_net()`'s parameters."""
  def dense(m):
    return {"kernel": m.kernel[...], **({"bias": m.bias[...]} if m.bias is not None else {})}

  def block(b):
    return {"norm": {"scale": b.norm.scale[...]}, "mlp_norm": {"scale": b.mlp_norm.scale[...]},
            **{n: {"w": getattr(b, n).w[...]} for n in "qkvo"},
            **{n: dense(getattr(b, n)) for n in ("gate", "up", "down")}}

  return {"embed": {"embedding": net.embed.embedding[...]}, "head": dense(net.head),
          **{f"blocks_{i}": block(b) for i, b in enumerate(net.blocks)}}
