"""The smoke DAG: every stage real and small. Its parameters carry every knob; defaults run in ~1.5 min on CPU."""

from kfp import dsl

from components import calibration as calibration_steps
from components import smoke as step


@dsl.pipeline(name="smoke", description="Synthetic multimodal data -> packed shards -> NaViT checkpoint -> "
              "predictions, calibration metrics -> report.html")
def smoke(seed: int = 0, num_train: int = 600, num_val: int = 150, num_test: int = 150,
          seq_len: int = 256, patch_size: int = 16, max_images: int = 16, max_patches_per_image: int = 64,
          num_shards: int = 2, steps: int = 120, batch_size: int = 16, learning_rate: float = 3e-3,
          width: int = 64, depth: int = 2) -> dsl.HTML:
  data = step.make_synthetic_data(seed=seed, num_train=num_train, num_val=num_val, num_test=num_test)
  shards = step.build_shards(data=data.outputs["data"], seq_len=seq_len, patch_size=patch_size,
                              max_images=max_images, max_patches_per_image=max_patches_per_image,
                              num_shards=num_shards)
  checkpoint = step.train(shards=shards.outputs["shards"], seed=seed, steps=steps, batch_size=batch_size,
                           learning_rate=learning_rate, width=width, depth=depth)
  evaluation = step.evaluate(shards=shards.outputs["shards"], checkpoint=checkpoint.outputs["checkpoint"])
  calibration = calibration_steps.calibrate(evaluation=evaluation.outputs["evaluation"])
  report = step.report(shards=shards.outputs["shards"], checkpoint=checkpoint.outputs["checkpoint"],
                        evaluation=evaluation.outputs["evaluation"],
                        calibration=calibration.outputs["calibration"])
  return report.outputs["report"]
