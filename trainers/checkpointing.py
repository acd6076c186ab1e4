"""Orbax checkpoints of (model, optimizer) NNX state, and a stable digest of the parameters."""

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore_latest(manager: ocp.CheckpointManager, *nodes) -> int | None:
  """Restores the newest checkpoint into the given NNX nodes in place; returns its step or None."""
  step = manager.latest_step()
  if step is None:
    return None
  state = nnx.state(nodes)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  nnx.update(nodes, restored)
  return step


def params_sha256(model: nnx.Module) -> str:
  """sha256 over every parameter's bytes, in sorted path order (independent of dict ordering)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  digest = hashlib.sha256()
  for path, variable in sorted(flat, key=lambda kv: tuple(str(p) for p in kv[0])):
    value = np.asarray(variable.get_value() if hasattr(variable, "get_value") else variable.value)
    digest.update("/".join(str(p) for p in path).encode())
    digest.update(str(value.dtype).encode() + str(value.shape).encode())
    digest.update(value.tobytes())
  return digest.hexdigest()
