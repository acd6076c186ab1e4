"""Smoke config: a tiny NaViT on the synthetic source, CPU, about 20 seconds of training.

  patchflow run smoke          # the whole DAG, this config's values as the pipeline defaults
  python -m trainers.train --data runs/.../shards --workdir /tmp/w --config smoke

Expected: training loss falls from ~1.8 (ln 6) to below 0.5; validation accuracy >= 0.8 (chance 1/6).
"""


def get_config() -> dict:
  return {
      "seed": 0,
      "model": {"width": 64, "depth": 2, "heads": 4, "mlp_dim": 128, "dropout": 0.0},
      "train": {"steps": 120, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 30,
                "weight_decay": 1e-4, "checkpoint_every": 40, "log_every": 10, "keep_checkpoints": 2,
                "label_smoothing": 0.0},
  }
