"""NaViT-B/16 (width 768, depth 12, 12 heads, MLP 3072) with the ViT-22B block recipe, on packed shards.

  patchflow train --config navit_b16 --data gs://BUCKET/shards --workdir /tmp/navit_b16 \\
      --set mesh.data=16 --set mesh.model=2

Shapes come from the shards' dataset_info.json; everything else as navit_s16, with a lower learning rate.

Not run here, at any scale: the expectation on ImageNet-scale packed shards (L=256, patch 16, 90k steps at
batch 1024) of top-1 near the high 70s is quoted from the NaViT paper's B/16 runs, not measured.
"""

from trainers.configs import navit_s16


def get_config() -> dict:
  config = navit_s16.get_config()
  config["model"].update({"width": 768, "depth": 12, "heads": 12, "mlp_dim": 3072})
  config["train"].update({"learning_rate": 8e-4})
  return config
