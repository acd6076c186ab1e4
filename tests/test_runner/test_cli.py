import json
import os
import subprocess
import sys

import pytest
import yaml

from pipelines import registry
from runner.cli import main
from runner.local_run import check_outputs, dag_tasks, last_error_line
from schemas.errors import ContractError

SMOKE_TASKS = {"make-synthetic-data", "build-shards", "train", "evaluate", "calibrate", "report"}


def test_compile_writes_kfp_ir_with_every_step(tmp_path, capsys):
  out = tmp_path / "smoke.yaml"
  assert main(["compile", "smoke", "--output", str(out), "--set", "steps=7"]) == 0
  spec = yaml.safe_load(out.read_text())
  assert set(spec["root"]["dag"]["tasks"]) == SMOKE_TASKS
  assert spec["root"]["inputDefinitions"]["parameters"]["steps"]["defaultValue"] == 7
  for executor in spec["deploymentSpec"]["executors"].values():
    assert executor["container"]["image"].startswith("ghcr.io/patchflow/patchflow")
    assert "pip install" not in " ".join(executor["container"]["command"])  # nothing fetched at run time


def test_compile_into_a_missing_directory_makes_it_and_leaves_no_temporary_file(tmp_path, capsys):
  out = tmp_path / "new" / "deeper" / "smoke.yaml"
  assert main(["compile", "smoke", "--output", str(out)]) == 0
  assert set(yaml.safe_load(out.read_text())["root"]["dag"]["tasks"]) == SMOKE_TASKS
  assert os.listdir(out.parent) == ["smoke.yaml"]


def test_compile_under_a_file_is_one_line_and_writes_nothing(tmp_path, capsys):
  (tmp_path / "a_file").write_text("keep me")
  for below in ("smoke.yaml", "deeper/smoke.yaml"):
    assert main(["compile", "smoke", "--output", str(tmp_path / "a_file" / below)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("patchflow: error: ") and "is a file, not a directory" in err and "\n" not in err
  assert sorted(os.listdir(tmp_path)) == ["a_file"] and (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.parametrize("argv, message", [
    (["compile", "smoke", "--output", "/dev/null/smoke.yaml"],
     "--output '/dev/null/smoke.yaml': a folder above it is a file, not a directory"),
    (["run", "nope"], "unknown pipeline 'nope' (known: action_localisation, calibration_study, smoke)"),
    (["run", "smoke", "--set", "steps=ten"], "parameter 'steps': expected int, got 'ten'"),
    (["run", "smoke", "--set", "learning_rate=fast"], "parameter 'learning_rate': expected float"),
    (["run", "smoke", "--set", "stepz=3"], "unknown parameter 'stepz' for pipeline 'smoke'"),
    (["run", "smoke", "--set", "steps"], "parameter 'steps': expected KEY=VALUE"),
    (["compile", "nope", "--output", "x.yaml"], "unknown pipeline 'nope'"),
])
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, capsys):
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"patchflow: error: {message}" or (err.startswith("patchflow: error: ") and message in err)
  assert "\n" not in err


def test_parameters_are_typed_from_the_pipeline_signature():
  smoke = registry.get_pipeline("smoke")
  assert registry.parse_parameters(smoke, ["steps=5", "learning_rate=1", "seed=2"]) == {
      "steps": 5, "learning_rate": 1.0, "seed": 2}


def test_success_reported_by_kfp_is_not_trusted_without_outputs(tmp_path):
  tasks = dag_tasks(registry.get_pipeline("smoke"))
  assert tasks["evaluate"] == ["evaluation"]  # the Metrics artifact lives in executor output, not on disk
  root = tmp_path / "exec"
  for task, artifacts in tasks.items():
    (root / task).mkdir(parents=True)
    (root / task / "executor_output.json").write_text("{}")
    for a in artifacts:
      (root / task / a).write_text("x")
  statuses = {t: "SUCCESS" for t in tasks}
  assert {v for v, _ in check_outputs(str(root), tasks, statuses).values()} == {"SUCCEEDED"}
  (root / "train" / "checkpoint").unlink()
  (root / "report" / "executor_output.json").unlink()
  statuses.pop("evaluate")
  verdicts = check_outputs(str(root), tasks, statuses)
  assert verdicts["train"][0] == "FAILED" and "'checkpoint' missing or empty" in verdicts["train"][1]
  assert verdicts["report"][0] == "FAILED" and "executor_output.json" in verdicts["report"][1]
  assert verdicts["evaluate"][0] == "NOT_RUN"


def test_last_error_line_is_cut_from_the_failing_step(tmp_path):
  log = tmp_path / "kfp.log"
  log.write_text("\n".join([
      "12:00 - INFO - Executing task \x1b[96m'a'\x1b[0m", "    ValueError: not this one",
      "12:00 - INFO - Task 'a' finished with status SUCCESS",
      "12:01 - INFO - Executing task 'b'", "    Traceback (most recent call last):",
      "    schemas.errors.ContractError: manifest.jsonl:3: not valid JSON",
      "12:01 - ERROR - Task 'b' finished with status FAILURE"]))
  assert last_error_line(str(log), "b") == "ContractError: manifest.jsonl:3: not valid JSON"


def test_compile_for_a_target_applies_image_and_resources(tmp_path):
  out = tmp_path / "tpu.yaml"
  assert main(["compile", "smoke", "--target", "vertex-tpu", "--output", str(out)]) == 0
  executors = yaml.safe_load(out.read_text())["deploymentSpec"]["executors"]
  with_accelerator = {name for name, e in executors.items() if "accelerator" in e["container"].get("resources", {})}
  assert with_accelerator == {"exec-train"}  # the train step gets the TPU, no other step does
  assert executors["exec-train"]["container"]["resources"]["accelerator"]["resourceType"] == "TPU_V5_LITEPOD"
  assert executors["exec-train"]["container"]["resources"]["resourceMemoryLimit"] == "48G"
  assert {e["container"]["image"] for e in executors.values()} == {
      "us-docker.pkg.dev/YOUR_PROJECT/patchflow/patchflow:0.1.0-tpu"}


def test_unknown_target_is_one_clear_line(capsys):
  assert main(["compile", "smoke", "--target", "tpu-pod", "--output", "x.yaml"]) == 2
  assert capsys.readouterr().err.strip() == (
      "patchflow: error: unknown target 'tpu-pod' (known: local, vertex-cpu, vertex-gpu, vertex-tpu, kfp)")


def test_loop_tasks_are_checked_in_every_iteration(tmp_path):
  tasks = dag_tasks(registry.get_pipeline("calibration_study"))
  loop = [t for t in tasks if "-iteration-*/" in t]
  assert sorted(t.rsplit("/", 1)[1] for t in loop) == ["evaluate-model", "train-model"]
  root = tmp_path / "exec"
  for task, artifacts in tasks.items():
    for d in ([root / task.replace("*", str(i)) for i in range(3)] if "*" in task else [root / task]):
      d.mkdir(parents=True)
      (d / "executor_output.json").write_text("{}")
      for a in artifacts:
        (d / a).mkdir()
        (d / a / "x").write_text("x")
  statuses = {t.rsplit("/", 1)[-1]: "SUCCESS" for t in tasks}
  assert {v for v, _ in check_outputs(str(root), tasks, statuses).values()} == {"SUCCEEDED"}
  train = next(t for t in loop if t.endswith("train-model"))
  (root / train.replace("*", "2") / "executor_output.json").unlink()  # one iteration of three failed
  assert check_outputs(str(root), tasks, statuses)[train][0] == "FAILED"


def test_list_parameters_are_json():
  study = registry.get_pipeline("calibration_study")
  params = registry.parse_parameters(study, ['models=[{"name": "S", "width": 8, "depth": 1, "methods": []}]'])
  assert params["models"][0]["width"] == 8
  with pytest.raises(ContractError, match="parameter 'models': expected a JSON list"):
    registry.parse_parameters(study, ["models=S,M"])
  with pytest.raises(ContractError, match="parameter 'models': expected list"):
    registry.parse_parameters(study, ['models={"a": 1}'])


def test_study_compiles_with_a_parallel_for(tmp_path):
  out = tmp_path / "study.yaml"
  assert main(["compile", "calibration_study", "--output", str(out), "--set", "steps=5"]) == 0
  spec = yaml.safe_load(out.read_text())
  loops = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
  assert len(loops) == 1 and loops[0]["iteratorPolicy"]["parallelismLimit"] == 2
  assert {"make-synthetic-data", "build-shards", "study-report"} <= set(spec["root"]["dag"]["tasks"])


def test_a_target_with_beam_args_sends_the_shard_builder_to_dataflow(tmp_path):
  out = tmp_path / "cpu.yaml"
  assert main(["compile", "smoke", "--target", "vertex-cpu", "--output", str(out)]) == 0
  spec = yaml.safe_load(out.read_text())
  beam_args = spec["root"]["dag"]["tasks"]["build-shards"]["inputs"]["parameters"]["beam_args"]
  args = json.loads(beam_args["runtimeValue"]["constant"])
  assert args[:2] == ["--runner", "DataflowRunner"] and "--temp_location" in args
  local = tmp_path / "local.yaml"
  assert main(["compile", "smoke", "--output", str(local)]) == 0
  params = yaml.safe_load(local.read_text())["root"]["dag"]["tasks"]["build-shards"]["inputs"]["parameters"]
  assert json.loads(params["beam_args"]["runtimeValue"]["constant"]) == []


def test_the_study_compiles_for_a_target(tmp_path):
  out = tmp_path / "study-gpu.yaml"
  assert main(["compile", "calibration_study", "--target", "vertex-gpu", "--output", str(out)]) == 0
  executors = yaml.safe_load(out.read_text())["deploymentSpec"]["executors"]
  with_accelerator = {name for name, e in executors.items() if "accelerator" in e["container"].get("resources", {})}
  assert with_accelerator == {"exec-train-model", "exec-evaluate-model"}
  assert executors["exec-train-model"]["container"]["resources"]["accelerator"]["resourceType"] == "NVIDIA_A100_80GB"
  assert {e["container"]["image"] for e in executors.values()} == {
      "us-docker.pkg.dev/YOUR_PROJECT/patchflow/patchflow:0.1.0-cuda"}
  cpu = tmp_path / "study-cpu.yaml"
  assert main(["compile", "calibration_study", "--target", "vertex-cpu", "--output", str(cpu)]) == 0
  tasks = yaml.safe_load(cpu.read_text())["root"]["dag"]["tasks"]
  args = json.loads(tasks["build-shards"]["inputs"]["parameters"]["beam_args"]["runtimeValue"]["constant"])
  assert args[:2] == ["--runner", "DataflowRunner"]


def test_a_vertex_smoke_run_trains_any_config_with_any_override(tmp_path):
  out = tmp_path / "navit.yaml"
  overrides = {"train.steps": 50, "model.depth": 3, "train.learning_rate": 5e-4}
  assert main(["compile", "smoke", "--target", "vertex-gpu", "--output", str(out), "--set", "config=navit_s16",
               "--set", f"overrides={json.dumps(overrides)}"]) == 0
  spec = yaml.safe_load(out.read_text())
  inputs = spec["root"]["inputDefinitions"]["parameters"]
  assert inputs["config"]["defaultValue"] == "navit_s16"
  train = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
  assert train["config"] == {"componentInputParameter": "config"}
  assert train["overrides"] == {"componentInputParameter": "overrides"}
  # What the train step builds from the compiled values: KFP's Struct turned every number into a float.
  from trainers.configs import build_config
  compiled = inputs["overrides"]["defaultValue"]
  assert compiled["train.steps"] == 50.0
  shortcuts = {name: inputs[name]["defaultValue"] for name in ("steps", "batch_size", "learning_rate", "width", "depth")}
  config = build_config(inputs["config"]["defaultValue"], {"seed": 0, **compiled}, **shortcuts)
  assert config["train"]["steps"] == 50 and isinstance(config["train"]["steps"], int)
  assert config["model"]["depth"] == 3 and config["model"]["width"] == 384  # navit_s16's width, not smoke's
  assert config["train"]["learning_rate"] == 5e-4


def test_shortcuts_then_overrides_build_the_trained_config():
  from trainers.configs import build_config, load_config
  assert build_config("smoke", {}, steps=0, width=0) == load_config("smoke")  # 0 keeps the config's value
  config = build_config("smoke", {"train.steps": 9}, steps=5, width=32)
  assert config["train"]["steps"] == 9 and config["model"]["width"] == 32  # overrides win over shortcuts
  with pytest.raises(ContractError, match="config override 'train.stepz': unknown key 'stepz'"):
    build_config("smoke", {"train.stepz": 1})
  with pytest.raises(ContractError, match="overrides: expected a JSON object"):
    build_config("smoke", ["train.steps"])


def test_dotted_set_keys_are_config_overrides():
  smoke = registry.get_pipeline("smoke")
  params = registry.parse_parameters(smoke, ['overrides={"model.depth": 1}', "train.steps=5", "config=navit_s16"])
  assert params == {"overrides": {"model.depth": 1, "train.steps": "5"}, "config": "navit_s16"}
  with pytest.raises(ContractError, match="parameter 'overrides': expected a JSON dict"):
    registry.parse_parameters(smoke, ["overrides=train.steps:5"])


def test_the_rerun_form_sends_lists_and_dicts_back_as_json():
  from runner.ui import _form_value
  study = registry.get_pipeline("calibration_study")
  models = [{"name": "S", "width": 8, "depth": 1, "methods": [{"method": "deterministic", "temperature_scaling": True}]}]
  sent = {"models": _form_value(models), "overrides": _form_value({"train.steps": 5}), "steps": _form_value(7)}
  assert registry.parse_parameters(study, [f"{k}={v}" for k, v in sent.items()]) == {
      "models": models, "overrides": {"train.steps": 5}, "steps": 7}


@pytest.mark.parametrize("argv, message", [
    (["run", "smoke", "--set", 'overrides={"train.stepz": 5}'], "config override 'train.stepz': unknown key 'stepz'"),
    (["run", "smoke", "--set", "train.steps=many"], "config override 'train.steps': cannot parse 'many'"),
    (["run", "smoke", "--set", "config=nope"], "config 'nope': not a known name"),
    (["compile", "smoke", "--output", "x.yaml", "--set", 'overrides={"model.depth": "two"}'],
     "config override 'model.depth': cannot parse 'two'"),
    (["run", "calibration_study", "--set", "steps=-3"], "parameter 'steps': expected an int >= 0"),
])
def test_a_bad_train_config_is_refused_before_the_run_starts(argv, message, capsys, tmp_path):
  assert main([*argv, *(["--home", str(tmp_path)] if argv[0] == "run" else [])]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("patchflow: error: ") and message in err and "\n" not in err
  assert not list(tmp_path.iterdir())  # no run directory, no history entry


@pytest.mark.parametrize("pipeline", registry.names())
def test_every_pipeline_compiles_for_every_target(pipeline, tmp_path):
  from pipelines.targets import load_targets
  for target, settings in load_targets().items():
    out = tmp_path / f"{pipeline}-{target}.yaml"
    assert main(["compile", pipeline, "--target", target, "--output", str(out)]) == 0
    executors = yaml.safe_load(out.read_text())["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {settings["image"]}
