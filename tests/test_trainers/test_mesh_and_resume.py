"""The trainer's production guarantees, each run as a real `python -m trainers.train` process where it matters."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from multidevice import run_with_cpu_devices

TINY = ["--set", "model.width=32", "--set", "model.depth=1", "--set", "model.heads=2", "--set", "model.mlp_dim=32",
        "--set", "train.batch_size=4", "--set", "train.warmup_steps=2"]


def _train_cmd(shard_dir, workdir, *extra):
  return [sys.executable, "-m", "trainers.train", "--data", str(shard_dir), "--workdir", str(workdir), *TINY, *extra]


@pytest.mark.slow
def test_two_by_two_mesh_reaches_the_same_loss_as_one_device(shard_dir, tmp_path):
  script = textwrap.dedent(f"""
      import json, jax, numpy as np
      from flax import nnx
      from trainers.configs import apply_overrides, load_config
      from trainers.train import train, load_trained_model
      assert len(jax.devices()) == 4
      out = {{}}
      for data, model in ((1, 1), (2, 2)):
        config = apply_overrides(load_config("smoke"), {{
            "train.steps": 5, "train.checkpoint_every": 5, "train.log_every": 1, "train.batch_size": 4,
            "model.width": 32, "model.depth": 1, "model.heads": 2, "model.mlp_dim": 32,
            "mesh.data": data, "mesh.model": model}})
        workdir = "{tmp_path}/mesh{{data}}x{{model}}"
        final = train("{shard_dir}", workdir, config, log=lambda m: None)
        losses = [json.loads(l)["loss"] for l in open(workdir + "/metrics.jsonl")]
        trained, _ = load_trained_model(workdir)
        kernel = np.asarray(trained.blocks[0].qkv.kernel[...])
        out[f"{{data}}x{{model}}"] = {{"losses": losses, "kernel": kernel.ravel()[:64].tolist()}}
      print("RESULT " + json.dumps(out))
  """)
  out = json.loads(run_with_cpu_devices(script, 4, marker="RESULT ").split("RESULT ", 1)[1])
  assert out["1x1"]["losses"] == pytest.approx(out["2x2"]["losses"], rel=1e-4)
  assert out["1x1"]["kernel"] == pytest.approx(out["2x2"]["kernel"], rel=1e-3, abs=1e-5)


def test_sharding_rules_split_weights_over_both_axes():
  from trainers.sharding import spec_for

  class FakeMesh:
    shape = {"data": 2, "model": 2}
  assert tuple(spec_for("blocks/0/qkv/kernel", (64, 192), FakeMesh())) == ("data", "model")
  assert tuple(spec_for("blocks/0/mlp_out/kernel", (128, 64), FakeMesh())) == ("model", "data")
  assert tuple(spec_for("head/kernel", (64, 6), FakeMesh())) == ("data", None)
  assert tuple(spec_for("blocks/0/qkv/kernel", (63, 192), FakeMesh())) == (None, "model")  # 63 does not split
  assert tuple(spec_for("norm/scale", (64,), FakeMesh())) == ()


def test_activations_are_pinned_by_rule_on_a_2x2_mesh():
  script = textwrap.dedent("""
      import jax, numpy as np
      from trainers.sharding import constrain, make_mesh
      x = np.ones((4, 8, 6), np.float32)
      assert constrain(x, "hidden") is x  # no mesh set: unchanged
      with jax.set_mesh(make_mesh(2, 2)):
        hidden = jax.jit(lambda x: constrain(x * 2, "hidden"))(x)
        odd = jax.jit(lambda x: constrain(x * 2, "hidden"))(np.ones((4, 8, 3), np.float32))
        heads = jax.jit(lambda x: constrain(x * 2, "heads"))(np.ones((4, 8, 2, 5), np.float32))
      spec = lambda a: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
      assert spec(hidden) == ("data", None, "model"), hidden.sharding
      assert spec(odd) == ("data", None, None), odd.sharding  # 3 units do not split over 2
      assert spec(heads) == ("data", None, "model", None), heads.sharding
      print("PINNED-OK")
  """)
  run_with_cpu_devices(script, 4, marker="PINNED-OK")


def _wait_for_step(path, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path):
      rows = [json.loads(l) for l in open(path) if l.strip()]
      if rows and rows[-1]["step"] >= step:
        return
    assert proc.poll() is None, "training ended before it could be killed"
    time.sleep(0.05)
  raise TimeoutError(path)


@pytest.mark.slow
def test_sigkill_then_same_command_gives_bit_identical_parameters(shard_dir, tmp_path):
  extra = ["--set", "train.steps=80", "--set", "train.checkpoint_every=5", "--set", "train.log_every=1"]
  whole = subprocess.run(_train_cmd(shard_dir, tmp_path / "whole", *extra), capture_output=True, text=True,
                         timeout=600)
  assert whole.returncode == 0, whole.stderr[-2000:]
  cmd = _train_cmd(shard_dir, tmp_path / "killed", *extra)
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for_step(tmp_path / "killed" / "metrics.jsonl", 17, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "killed" / "final.json").exists()
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "train: resumed from checkpoint at step" in again.stderr
  a = json.loads((tmp_path / "whole" / "final.json").read_text())
  b = json.loads((tmp_path / "killed" / "final.json").read_text())
  assert a["params_sha256"] == b["params_sha256"] and a["loss"] == b["loss"]
  steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, 81))


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(shard_dir, tmp_path):
  base = ["--set", "train.steps=30", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"]
  ok = subprocess.run(_train_cmd(shard_dir, tmp_path / "w", *base, "--set", "train.steps=4"), capture_output=True,
                      text=True, timeout=600)
  assert ok.returncode == 0, ok.stderr[-2000:]
  # Same workdir, an absurd learning rate: resumes from step 4, then the loss overflows.
  bad = subprocess.run(_train_cmd(shard_dir, tmp_path / "w", *base, "--set", "train.learning_rate=1e30",
                                  "--set", "train.warmup_steps=1"), capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0
  last = bad.stderr.strip().splitlines()[-1]
  assert "FloatingPointError: train: loss is" in last and "at step" in last and "(step 4)" in last
  assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit())[-1] == "4"


@pytest.mark.slow
def test_checkpoint_from_other_data_is_refused(shard_dir, tmp_path):
  ok = subprocess.run(_train_cmd(shard_dir, tmp_path / "w", "--set", "train.steps=2", "--set",
                                 "train.checkpoint_every=2"), capture_output=True, text=True, timeout=600)
  assert ok.returncode == 0, ok.stderr[-2000:]
  again = subprocess.run(_train_cmd(shard_dir, tmp_path / "w", "--set", "train.steps=4", "--set",
                                    "train.batch_size=2"), capture_output=True, text=True, timeout=600)
  assert again.returncode != 0
  assert "checkpoint at step 2 was made with batch_size=4, this run has 2" in again.stderr
