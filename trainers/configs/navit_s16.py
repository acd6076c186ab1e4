"""NaViT-S/16 (width 384, depth 12, 6 heads, MLP 1536) with the ViT-22B block recipe, on packed shards.

  patchflow train --config navit_s16 --data gs://BUCKET/shards --workdir /tmp/navit_s16 \\
      --set mesh.data=8 --set mesh.model=1

Shapes (sequence length, patch size, images per sequence, classes) come from the shards' dataset_info.json.

Not run here: these settings (90k steps at batch 1024) on ImageNet-scale packed shards (L=256, patch 16). The
expectation for them, top-1 in the mid 70s, is quoted from the NaViT paper's S/16 runs, not measured.

Measured here (2026-12-04, 2-core CPU, no accelerator): a short run on the synthetic source,
  patchflow shards build --manifest synthetic:seed=0 --output /tmp/x
  patchflow train --data /tmp/x --workdir /tmp/w --config navit_s16 --set train.steps=100 \\
      --set train.batch_size=4 --set train.warmup_steps=10 --set train.log_every=10 \\
      --set train.checkpoint_every=100
reaches validation accuracy 0.793 (chance 1/6) in 2 min 48 s.
"""

from trainers.configs import smoke


def get_config() -> dict:
  config = smoke.get_config()
  config["model"].update({"width": 384, "depth": 12, "heads": 6, "mlp_dim": 1536, "parallel_block": True,
                          "qk_norm": True, "use_bias": False, "posemb": "fractional", "posemb_buckets": 32,
                          "pool": "map", "dtype": "bfloat16", "token_drop": 0.0})
  config["train"].update({"steps": 90_000, "batch_size": 1024, "learning_rate": 1e-3, "warmup_steps": 10_000,
                          "weight_decay": 1e-4, "checkpoint_every": 1000, "log_every": 100, "keep_checkpoints": 3})
  return config
