"""How parameters and activations are partitioned over a `jax.sharding.Mesh`.

A catjax mesh has two named axes:

- `data`: windows (the batch axis) of every activation, calibration and eval;
- `model`: tensor parallelism. Linears that read the residual stream
  (q/k/v, gate/up: "column parallel") split their output features, the
  linears after them (o, down: "row parallel", `Site.row_parallel` of the
  architecture spec) split their input features, so a block needs one
  all-reduce after each of its two halves; the vocabulary of the embedding
  and of the head splits too. Norm scales are replicated.

Everything else is XLA's (GSPMD): the jitted forward, the statistics hook
(sums over the token axis become all-reduces over `data`) and the loss see
sharded inputs and propagate the partitioning. This module is the one place
that names partitions; `make_mesh` parses `--mesh data=N,model=M`.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from catjax.models.llama import Llama
from catjax.models.spec import ArchSpec, Path, spec_for

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
  """A `(data, model)` mesh from "data=N,model=M" (either may be left out).

  Default: every device on `data`. The sizes must multiply to the number of
  devices (`jax.devices()` unless `devices` is given).

  Raises:
    ValueError: naming the spec and what was expected.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {DATA: None, MODEL: 1}
  if spec:
    for part in spec.split(","):
      m = re.fullmatch(r"\s*(data|model)\s*=\s*(\d+)\s*", part)
      if not m or int(m[2]) < 1:
        raise ValueError(f"mesh {spec!r}: expected 'data=N,model=M' with positive sizes, "
                         f"got {part!r}")
      sizes[m[1]] = int(m[2])
  if sizes[DATA] is None:
    if len(devices) % sizes[MODEL]:
      raise ValueError(f"mesh {spec!r}: model={sizes[MODEL]} does not divide the "
                       f"{len(devices)} devices")
    sizes[DATA] = len(devices) // sizes[MODEL]
  if sizes[DATA] * sizes[MODEL] != len(devices):
    raise ValueError(f"mesh {spec!r}: data × model = {sizes[DATA] * sizes[MODEL]}, but there "
                     f"are {len(devices)} devices")
  grid = np.asarray(devices, dtype=object).reshape(sizes[DATA], sizes[MODEL])
  return Mesh(grid, AXES)


def initialize_distributed(coordinator: str, *, num_processes: int, process_id: int,
                           cpu_collectives: str = "gloo") -> None:
  """`jax.distributed.initialize` for a multi-process (multi-host) run.

  Call it first thing in every process, before any other JAX call; then
  `jax.devices()` lists every process's devices and `make_mesh` spans them.
  On CPU, cross-process collectives need an implementation (`gloo`).

  Args:
    coordinator: "host:port" of process 0, reachable from every process.
    num_processes / process_id: this run's size and this process's rank.
    cpu_collectives: "gloo" or "mpi" (CPU backends only).
  """
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)  # CPU backend only
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def default_mesh(spec: str | None) -> Mesh | None:
  """`make_mesh(spec)`; for None, all devices on `data` when there are several, else None."""
  if spec is None and len(jax.devices()) == 1:
    return None
  return make_mesh(spec)


def param_partition(spec: ArchSpec, path: Path, ndim: int) -> P:
  """The partition of the parameter at `path` (under the model) with `ndim` axes."""
  if path == ("embed",):
    return P(MODEL, None)
  if path == ("lm_head", "kernel"):
    return P(None, MODEL)
  if path[0] == "layers" and len(path) == 4:
    linear = path[1:3]
    for site in spec.sites:
      if linear in site.linears:
        if path[3] == "kernel":  # (layers, d_in, d_out)
          return P(None, MODEL, None) if site.row_parallel else P(None, None, MODEL)
        return P(None, None) if site.row_parallel else P(None, MODEL)  # bias (layers, d_out)
  return P(*([None] * ndim))


def param_sharding(mesh: Mesh, spec: ArchSpec, path: Path, shape) -> NamedSharding:
  """The `NamedSharding` of the parameter at `path` with `shape`.

  Raises:
    ValueError: a partitioned axis that the mesh axis size does not divide,
      naming the parameter.
  """
  partition = param_partition(spec, path, len(shape))
  for dim, axis in zip(shape, partition):
    if axis is not None and dim % mesh.shape[axis]:
      raise ValueError(f"parameter {'/'.join(path)} of shape {tuple(shape)}: axis of size "
                       f"{dim} cannot be split over mesh axis {axis!r} of size "
                       f"{mesh.shape[axis]}")
  return NamedSharding(mesh, partition)


def shard_model(model: Llama, mesh: Mesh) -> Llama:
  """Place every parameter of `model` on `mesh` by `param_partition` (in place) and return it.

  Raises:
    ValueError: as `param_sharding`.
  """
  spec = spec_for(model.config)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    path = tuple(str(k) for k in path)
    var.set_value(jax.device_put(var.value, param_sharding(mesh, spec, path, var.value.shape)))
  return model


def placement(mesh: Mesh):
  """A `place` for the loaders (`catjax.models.load_model(..., place=)`): each
  loaded parameter is written straight onto its sharding, every device (of
  this process) receiving only its slice."""
  return lambda spec, path, shape: param_sharding(mesh, spec, path, shape)


def shard_batch(x, mesh: Mesh | None):
  """`x` with its leading (window) axis split over `data`; replicated when the
  mesh's data size does not divide it (a last, short batch). No-op without a mesh."""
  if mesh is None:
    return x
  split = x.shape[0] % mesh.shape[DATA] == 0
  spec = P(DATA, *([None] * (x.ndim - 1))) if split else P()
  return jax.device_put(x, NamedSharding(mesh, spec))


def host_value(x: jax.Array) -> np.ndarray:
  """`x` as one numpy array on this host, gathered from every process when
  it is split across processes (multi-host runs)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def barrier(name: str) -> None:
  """Wait until every process gets here (multi-process runs; else nothing)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
