"""Sharding by rules on a `jax.sharding.Mesh` with axes ("data", "model").

Parameters and optimizer state follow one rule table (matched against the end of each variable's path):
FSDP shards a weight's input dimension over "data", tensor parallelism its output dimension over "model"
(and the reverse for the second matmul of a pair, so no activation is gathered between them). A dimension
that the axis size does not divide stays replicated. Batches are sharded over "data", and the model pins its
activations with ACTIVATION_RULES (batch over "data", heads and MLP hidden units over "model") rather than
leaving their layout to the compiler's propagation.
"""

import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from schemas.errors import ContractError

# (path suffix regex, spec for a 2-D weight). Biases, norms and scalars are replicated.
RULES = (
    (r"(qkv|mlp_in|kv|q)/kernel$", ("data", "model")),
    (r"(out|mlp_out)/kernel$", ("model", "data")),
    (r"embed/kernel$", ("data", "model")),
    (r"pos_(row|col)$", (None, "model")),
    (r"head/kernel$", ("data", None)),
    (r"moe/w_(in|out)$", ("model", None, None)),  # experts over the model axis
    (r"moe/b_(in|out)$", ("model", None)),
)

# Activation layouts by what they hold; applied by `constrain` inside the model when a mesh is set.
ACTIVATION_RULES = {
    "tokens": ("data", None, None),           # [B, L, D] residual stream
    "heads": ("data", None, "model", None),   # [B, L, H, d] queries, keys, values per head
    "hidden": ("data", None, "model"),        # [B, L, mlp_dim] MLP hidden units
}


def constrain(x, kind: str):
  """`x` pinned to ACTIVATION_RULES[kind] on the mesh set by `jax.set_mesh`; unchanged without one. An axis
  that does not divide its dimension is dropped, as for parameters."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = ACTIVATION_RULES[kind]
  spec = P(*(a if a is not None and x.shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(axes)))
  return jax.lax.with_sharding_constraint(x, spec)


def make_mesh(data: int, model: int) -> Mesh:
  devices = jax.devices()
  if data * model > len(devices):
    raise ContractError(f"mesh.data x mesh.model = {data} x {model} = {data * model}, but only {len(devices)} "
                        f"device(s) are visible (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  return Mesh(np.asarray(devices[:data * model]).reshape(data, model), ("data", "model"))


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  for pattern, axes in RULES:
    if re.search(pattern, path) and len(shape) == len(axes):
      return P(*(a if a is not None and shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(axes)))
  return P()


def shard_nodes(mesh: Mesh, *nodes) -> None:
  """Places every variable of the given NNX nodes on the mesh, in place, by RULES."""
  state = nnx.state(nodes)
  flat = nnx.to_flat_state(state)
  for path, variable in flat:
    value = variable.get_value()
    if hasattr(value, "shape"):
      name = "/".join(str(p) for p in path)
      variable.set_value(jax.device_put(value, NamedSharding(mesh, spec_for(name, value.shape, mesh))))
  nnx.update(nodes, nnx.from_flat_state(flat))


def shard_batch(mesh: Mesh, batch: dict) -> dict:
  """Batch arrays split over "data" along their first dimension."""
  return {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
