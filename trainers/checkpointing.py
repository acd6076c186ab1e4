"""Orbax checkpoints of (model, optimizer) NNX state, and a stable digest of the parameters."""

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


from schemas.errors import ContractError


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Async saves (training continues while a step is written); orbax commits each step by an atomic
  rename, so a run killed mid-save leaves the previous checkpoint as the latest."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True))


def save(manager: ocp.CheckpointManager, step: int, model, optimizer, position: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(nnx.state((model, optimizer))),
                                             data_position=ocp.args.JsonSave(position)))


def restore_latest(manager: ocp.CheckpointManager, *nodes, expect_position: dict | None = None) -> int | None:
  """Restores the newest checkpoint into the given NNX nodes in place (keeping their shardings); returns
  its step or None. With expect_position, refuses a checkpoint made on other data or batching."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(nodes))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                           data_position=ocp.args.JsonRestore()))
  position = restored["data_position"]
  if expect_position is not None:
    for key in (k for k in expect_position if k != "next_step"):
      if position.get(key) != expect_position[key]:
        raise ContractError(f"checkpoint at step {step} was made with {key}={position.get(key)!r}, this run has "
                            f"{expect_position[key]!r}; use a new workdir to start over")
  nnx.update(nodes, restored["state"])
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
