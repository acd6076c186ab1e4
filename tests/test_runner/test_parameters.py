"""Pipeline parameters are refused before a run exists: types from the signature, ranges from the declaration
next to each parameter (pipelines/parameters.py), one line and exit 2, no run directory, no history entry."""

import sys
import threading

import pytest

from pipelines import registry
from runner import local_run
from runner.cli import main
from runner.preflight import check_parameters
from schemas.errors import ContractError

SHORTCUT = "(0 keeps the config's value)"


@pytest.fixture
def no_run_may_start(monkeypatch):
  """A refused run must never reach its DAG process: starting one fails the test at once instead of running it."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"a run was started: {args[0] if args else kwargs}")
  monkeypatch.setattr(local_run.subprocess, "Popen", refuse)


@pytest.mark.parametrize("assignment, message", [
    ("steps=-5", f"parameter 'steps': expected an int >= 0 {SHORTCUT}, got -5"),
    ("seq_len=0", "parameter 'seq_len': expected an int >= 1, got 0"),
    ("num_shards=0", "parameter 'num_shards': expected an int >= 1, got 0"),
    ("batch_size=-1", f"parameter 'batch_size': expected an int >= 0 {SHORTCUT}, got -1"),
    ("max_images=0", "parameter 'max_images': expected an int >= 1, got 0"),
    ("patch_size=0", "parameter 'patch_size': expected an int >= 1, got 0"),
    ("num_train=0", "parameter 'num_train': expected an int >= 1, got 0"),
    ("num_val=-1", "parameter 'num_val': expected an int >= 1, got -1"),
    ("max_patches_per_image=999", "parameter 'max_patches_per_image': expected an int in [1, seq_len = 256], got 999"),
    ("max_patches_per_image=0", "parameter 'max_patches_per_image': expected an int in [1, seq_len = 256], got 0"),
    ("width=-1", f"parameter 'width': expected an int >= 0 {SHORTCUT}, got -1"),
    ("depth=-2", f"parameter 'depth': expected an int >= 0 {SHORTCUT}, got -2"),
    ("learning_rate=nan", f"parameter 'learning_rate': expected a finite float >= 0 {SHORTCUT}, got nan"),
    ("learning_rate=inf", f"parameter 'learning_rate': expected a finite float >= 0 {SHORTCUT}, got inf"),
    ("learning_rate=-0.1", f"parameter 'learning_rate': expected a finite float >= 0 {SHORTCUT}, got -0.1"),
    ("seed=-1", "parameter 'seed': expected an int in [0, 2147483647], got -1"),
])
def test_a_bad_smoke_parameter_is_one_line_before_any_run_exists(assignment, message, tmp_path, capsys,
                                                                 no_run_may_start):
  assert main(["run", "smoke", "--set", assignment, "--home", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err == f"patchflow: error: {message}\n"
  assert not list(tmp_path.iterdir())  # no run directory, no history


def test_a_range_bound_by_another_parameter_follows_it(tmp_path, capsys, no_run_may_start):
  assert main(["run", "smoke", "--set", "seq_len=64", "--set", "max_patches_per_image=65",
               "--home", str(tmp_path)]) == 2
  assert capsys.readouterr().err == ("patchflow: error: parameter 'max_patches_per_image': expected an int in "
                                     "[1, seq_len = 64], got 65\n")
  check_parameters(registry.get_pipeline("smoke"), {"seq_len": 64, "max_patches_per_image": 64})


def test_zero_keeps_the_configs_value_for_every_shortcut():
  smoke = registry.get_pipeline("smoke")
  check_parameters(smoke, {"steps": 0, "batch_size": 0, "learning_rate": 0.0, "width": 0, "depth": 0})
  check_parameters(smoke, {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "width": 16, "depth": 1})


@pytest.mark.parametrize("name, params, message", [
    ("calibration_study", {"steps": -1}, f"parameter 'steps': expected an int >= 0 {SHORTCUT}, got -1"),
    ("calibration_study", {"num_shards": 0}, "parameter 'num_shards': expected an int >= 1, got 0"),
    ("calibration_study", {"learning_rate": float("nan")}, "parameter 'learning_rate': expected a finite float"),
    ("action_localisation", {"frames": 4}, "parameter 'frames': expected an int >= 8, got 4"),
    ("action_localisation", {"size": 33}, "parameter 'size': expected an even int >= 32, got 33"),
    ("action_localisation", {"max_patches_per_image": 600},
     "parameter 'max_patches_per_image': expected an int in [1, seq_len = 512], got 600"),
    ("action_localisation", {"batch_size": -4}, f"parameter 'batch_size': expected an int >= 0 {SHORTCUT}"),
    ("action_localisation", {"num_test": 0}, "parameter 'num_test': expected an int >= 1, got 0"),
])
def test_every_pipeline_checks_its_ranges(name, params, message):
  with pytest.raises(ContractError) as caught:
    check_parameters(registry.get_pipeline(name), params)
  assert str(caught.value).startswith(message)


@pytest.mark.parametrize("name", registry.names())
def test_every_numeric_parameter_of_every_pipeline_declares_its_range(name):
  pipeline = registry.get_pipeline(name)
  signature, ranges = registry.signature(pipeline), registry.parameter_ranges(pipeline)
  numeric = {p for p, (kind, _) in signature.items() if kind in (int, float)}
  assert numeric and set(ranges) == numeric
  check_parameters(pipeline, {})  # the defaults are in range


def test_the_declared_clip_minimums_are_the_generators():
  from beam_jobs import synthetic_actions
  ranges = registry.parameter_ranges(registry.get_pipeline("action_localisation"))
  assert (ranges["frames"].low, ranges["size"].low) == (synthetic_actions.MIN_FRAMES, synthetic_actions.MIN_SIZE)


def test_a_ui_rerun_is_checked_like_a_cli_run(tmp_path):
  from runner import history
  from runner.ui import start_rerun
  history.save_run(str(tmp_path), {"id": "smoke-1", "pipeline": "smoke", "status": "SUCCEEDED", "params": {}})
  with pytest.raises(ContractError, match=r"parameter 'learning_rate': expected a finite float .*got nan"):
    start_rerun(str(tmp_path), "smoke-1", {"learning_rate": float("nan")})
  assert [r["id"] for r in history.list_runs(str(tmp_path))] == ["smoke-1"]


def test_pipelines_are_built_one_at_a_time_across_threads():
  """kfp's DSL keeps the pipeline being defined in a class attribute (dsl.pipeline_context.Pipeline), so two
  threads defining pipelines at once fail with `Nested pipelines are not allowed`: the UI's threads did."""
  errors, interval = [], sys.getswitchinterval()

  def build():
    try:
      for name in registry.names():
        registry.get_pipeline(name)
    except Exception as e:  # noqa: BLE001 - any failure of a concurrent build is the finding
      errors.append(repr(e))
  sys.setswitchinterval(1e-6)  # switch threads often, as a busy server does
  try:
    threads = [threading.Thread(target=build) for _ in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    sys.setswitchinterval(interval)
  assert errors == []
