"""Smoke config: a tiny NaViT on the synthetic source, CPU, about 20 seconds of training.

  patchflow run smoke          # the whole DAG, this config's values as the pipeline defaults
  python -m trainers.train --data runs/.../shards --workdir /tmp/w --config smoke

Expected: training loss falls from ~1.8 (ln 6) to below 0.5; validation accuracy >= 0.8 (chance 1/6).
"""


def get_config() -> dict:
  return {
      "seed": 0,
      "model": {"width": 64, "depth": 2, "heads": 4, "mlp_dim": 128, "parallel_block": False, "qk_norm": False,
                "use_bias": True, "posemb": "factorized", "posemb_buckets": 0, "pool": "gap", "dtype": "float32",
                "token_drop": 0.0, "dropout": 0.0,
                "moe": {"num_experts": 0, "k": 2, "router": "softmax_topk", "capacity_factor": 1.25,
                        "aux_weight": 0.01}},
      "train": {"steps": 120, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 30,
                "weight_decay": 1e-4, "checkpoint_every": 40, "log_every": 10, "keep_checkpoints": 2, "label_smoothing": 0.0, "peak_tflops": 0.0,
                # A finished run's workdir: parameters whose path and shape match start from its last checkpoint.
                "init_from": "",
                # Accept a final model whose validation loss is not finite or whose accuracy is at chance
                # (for experiments); otherwise such a run fails after writing its checkpoint (trainers/train.py).
                "allow_useless_model": False},
      "mesh": {"data": 1, "model": 1},
  }
