"""STAR tiny: tubelet queries over packed clips of the synthetic action videos, sized for a CPU.

  patchflow synthetic actions --output /tmp/actions          # 400/100/100 clips, 16 frames of 64x64 px
  patchflow shards build --manifest /tmp/actions/manifest.jsonl --output /tmp/shards --video --video-frames 8 \
      --seq-len 256 --patch-size 16 --max-images 2          # 4x4 patches x 8 frames = 128 tokens a clip
  patchflow train --data /tmp/shards --workdir /tmp/w --config star_tiny --set train.steps=600
  python -c "from evaluators.tubelets import evaluate_localisation as e; e('/tmp/shards', '/tmp/w', '/tmp/e')"

The encoder is NaViT's (width 64, depth 2, 4 heads); the decoder (depth 2) runs 8 spatial x F temporal
tubelet queries per clip (F = the shards' max_frames); matching and loss use DETR's weights (trainers/star.py).

Measured (2-core shared CPU, 2026-12-04; benchmarks/RESULTS.md#star_tiny-2026-12-04): the commands above train
in 2 min 54 s (600 steps of 16 sequences = 32 clips); train loss 5.3 -> 1.9, but val loss 4.4 (over-fitting
400 clips), val actor accuracy 0.43, box IoU 0.37; test frame-mAP@0.5 0.002, video-mAP@0.2 0.015,
video-mAP@0.5 0.000. Far from the target (frame-mAP@0.5 >= 0.5, video-mAP@0.5 >= 0.4 in a 10-minute
pipeline): with 3000 train clips and width 128 the train loss stalls near 3.8 and the test maps stay ~0.
2026-12-04 (same RESULTS section): the box path is right (8 clips overfit through the real commands: train
frame-mAP@0.5 0.95); `patchflow run action_localisation` at its defaults (this config's 120 steps) takes 2 min 13 s
with test frame-mAP@0.5 0.000, video-mAP@0.2 0.001, video-mAP@0.5 0.000; with 2000 train clips the loss stays
on the mean-box plateau (~3.9), and predict_tubelets' "label beats no action" rule leaves ~7 detections for 200
true tubes. tests/test_trainers/test_star.py overfits two clips with this model.
"""

from trainers.configs import smoke


def get_config() -> dict:
  config = smoke.get_config()
  config["task"] = "tubelets"
  config["model"] = {"width": 64, "depth": 2, "heads": 4, "mlp_dim": 128, "parallel_block": False,
                     "qk_norm": False, "use_bias": True, "dtype": "float32", "decoder_depth": 2, "num_queries": 8}
  config["loss"] = {"class": 1.0, "l1": 5.0, "giou": 2.0, "no_action": 0.3}  # trainers.star.LOSS_WEIGHTS
  return config
