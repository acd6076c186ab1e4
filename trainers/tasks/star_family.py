"""The STAR model family: one STAR encoder (trainers/star.py) shared by the datasets of every task of the
family, and one head per dataset head, of the kind its task reads:

  tubelets              STAR's tubelet decoder (queries, box and class heads, `model(...)`); one per model
  video_classification  a ClipHead, `model.clip_heads[head.name]` (`model.classify_clips(..., head.name)`)

A model with only the tubelet decoder is `build_star`'s, its parameters the same; a model without it has no
decoder (clip classification alone: pretraining an encoder).
"""

from flax import nnx

from schemas.errors import ContractError
from trainers.star import STAR

TUBELET_DECODER, CLIP_HEAD = "tubelet decoder", "clip head"
HEAD_KINDS = {"tubelets": TUBELET_DECODER, "video_classification": CLIP_HEAD}  # task name -> the head it reads
FAMILY = "star"


def _shapes(info: dict) -> dict:
  """What one encoder reads of a dataset: these must agree across the datasets (frames: its position table)."""
  return {"patch_size": info["patch_size"], "max_images": info["max_images"], "max_frames": info["max_frames"]}


def build_model(model_config: dict, datasets, seed: int) -> STAR:
  first = datasets[0]
  for dataset in datasets:
    if not dataset.info.get("video"):
      raise ContractError(f"datasets.{dataset.name}: {dataset.shards} holds images; the {dataset.task.name} task "
                          f"reads video shards (patchflow shards build --video)")
    if dataset.task.name not in HEAD_KINDS:
      raise ContractError(f"datasets.{dataset.name}.task: {dataset.task.name!r} has no head in the STAR family "
                          f"(known: {', '.join(sorted(HEAD_KINDS))})")
    for key, value in _shapes(dataset.info).items():
      if value != _shapes(first.info)[key]:
        raise ContractError(f"datasets.{dataset.name}: {key} {value} differs from {first.name}'s "
                            f"{_shapes(first.info)[key]}; one model reads both")
  heads = {d.head.name: (HEAD_KINDS[d.task.name], d.head) for d in datasets}
  decoders = sorted(name for name, (kind, _) in heads.items() if kind == TUBELET_DECODER)
  if len(decoders) > 1:
    raise ContractError(f"datasets: heads {', '.join(decoders)} each need a tubelet decoder and a STAR model has "
                        f"one; give their datasets one head (one label space)")
  info = first.info
  return STAR(model_config, patch_dim=info["patch_size"] ** 2 * 3,
              num_classes=heads[decoders[0]][1].num_classes if decoders else None, max_videos=info["max_images"],
              max_grid=max(d.info.get("max_patches_per_image") or d.info["seq_len"] for d in datasets),
              num_frames=info["max_frames"], max_actors=max(d.info.get("max_actors", 0) for d in datasets),
              clip_heads={name: head.num_classes for name, (kind, head) in sorted(heads.items()) if kind == CLIP_HEAD},
              rngs=nnx.Rngs(params=seed, dropout=seed + 1))
