"""STAR tiny: tubelet queries over packed clips of the synthetic action videos, sized for a CPU.

  patchflow synthetic actions --output data/actions   # 64x64 px, 16 frames, 1-3 actors, 8 actions

The encoder is NaViT's (width 64, depth 2, 4 heads); the decoder (depth 2) runs 8 spatial x F temporal
tubelet queries per clip; matching and loss use DETR's weights (trainers/star.py).

Nothing has been trained with this config yet: the tubelet shards and the train loop's STAR task are still
being built. The command to run and the result to expect will be added once they exist.
tests/test_trainers/test_star.py overfits two clips with this model.
"""

from trainers.configs import smoke


def get_config() -> dict:
  config = smoke.get_config()
  config["task"] = "tubelets"
  config["model"] = {"width": 64, "depth": 2, "heads": 4, "mlp_dim": 128, "parallel_block": False,
                     "qk_norm": False, "use_bias": True, "dtype": "float32", "decoder_depth": 2, "num_queries": 8}
  config["loss"] = {"class": 1.0, "l1": 5.0, "giou": 2.0, "no_action": 0.3}  # trainers.star.LOSS_WEIGHTS
  return config
