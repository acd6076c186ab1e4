"""Submission paths. The Kubeflow path talks HTTP to a small local server implementing the endpoints
kfp.Client uses; the Vertex path is checked up to the built PipelineJob (its `submit` is the one cloud call,
replaced here), with the pipeline-root bucket looked up in a local GCS emulator."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runner import history
from runner.cli import main
from runner.submit import build_vertex_job, check_bucket
from schemas.errors import ContractError


@pytest.fixture
def kfp_server():
  requests = []

  class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def _answer(self):
      length = int(self.headers.get("Content-Length") or 0)
      body = json.loads(self.rfile.read(length)) if length else None
      requests.append((self.command, self.path.split("?")[0], body))
      reply = {}
      if self.path.startswith("/apis/v2beta1/experiments") and self.command == "GET":
        reply = {"experiments": []}
      elif self.path.startswith("/apis/v2beta1/experiments"):
        reply = {"experiment_id": "exp-1", "display_name": body["display_name"]}
      elif self.path.startswith("/apis/v2beta1/runs"):
        reply = {"run_id": "run-42", "display_name": body["display_name"], "state": "PENDING"}
      data = json.dumps(reply).encode()
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    do_GET = do_POST = _answer

  server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{server.server_address[1]}", requests
  server.shutdown()


def test_submit_to_kubeflow_posts_the_compiled_pipeline(kfp_server, tmp_path, capsys):
  host, requests = kfp_server
  assert main(["submit", "smoke", "--target", "kfp", "--kfp-host", host, "--set", "steps=5",
               "--home", str(tmp_path)]) == 0
  out = capsys.readouterr().out.strip().splitlines()[-1]
  assert out.startswith("submitted smoke-") and out.endswith(f"{host}/#/runs/details/run-42")
  runs = [body for method, path, body in requests if method == "POST" and path == "/apis/v2beta1/runs"]
  assert len(runs) == 1
  run = runs[0]
  assert run["experiment_id"] == "exp-1"
  assert run["runtime_config"]["parameters"]["steps"] == 5
  train = run["pipeline_spec"]["deploymentSpec"]["executors"]["exec-train"]["container"]
  assert train["image"] == "ghcr.io/patchflow/patchflow:0.1.0-cuda"
  assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
  [record] = history.list_runs(str(tmp_path))
  assert record["status"] == "SUBMITTED" and record["target"] == "kfp" and record["console_url"].endswith("run-42")


@pytest.mark.slow
def test_vertex_job_is_built_with_template_parameters_labels_and_caching(tmp_path):
  from google.auth.credentials import AnonymousCredentials
  job = build_vertex_job("smoke", "vertex-tpu", "my-project", "us-central1", "gs://bucket/root", {"steps": 7},
                         "smoke-test-1", str(tmp_path), enable_caching=False, credentials=AnonymousCredentials())
  resource = job._gca_resource
  assert resource.display_name == "patchflow-smoke"
  assert resource.runtime_config.gcs_output_directory == "gs://bucket/root"
  assert resource.runtime_config.parameter_values["steps"] == 7
  assert resource.labels["patchflow-pipeline"] == "smoke" and resource.labels["patchflow-target"] == "vertex-tpu"
  spec = resource.pipeline_spec
  tasks = spec["root"]["dag"]["tasks"]
  assert all(t["cachingOptions"].get("enableCache", False) is False for t in tasks.values())
  executors = spec["deploymentSpec"]["executors"]
  assert executors["exec-train"]["container"]["resources"]["accelerator"]["resourceType"] == "TPU_V5_LITEPOD"
  assert "accelerator" not in executors["exec-evaluate"]["container"].get("resources", {})


def test_submit_to_vertex_checks_the_bucket_then_submits(gcs_emulator, tmp_path, monkeypatch, capsys):
  from google.cloud import aiplatform
  submitted = []
  monkeypatch.setattr(aiplatform.PipelineJob, "submit", lambda self, **kw: submitted.append(self))
  monkeypatch.setattr("google.auth.default", lambda *a, **k: (__import__(
      "google.auth.credentials", fromlist=["x"]).AnonymousCredentials(), "my-project"))
  assert main(["submit", "smoke", "--target", "vertex-cpu", "--project", "my-project", "--region", "us-central1",
               "--pipeline-root", "gs://patchflow-test/root", "--home", str(tmp_path)]) == 0
  assert len(submitted) == 1
  assert "console.cloud.google.com/vertex-ai/locations/us-central1/pipelines/runs/smoke-" in capsys.readouterr().out


def test_a_missing_bucket_is_one_clear_line(gcs_emulator, tmp_path, capsys):
  with pytest.raises(ContractError, match="bucket 'no-such-bucket' does not exist"):
    check_bucket("gs://no-such-bucket/root")
  assert main(["submit", "smoke", "--target", "vertex-cpu", "--project", "p", "--region", "us-central1",
               "--pipeline-root", "gs://no-such-bucket/root", "--home", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err == ("patchflow: error: --pipeline-root 'gs://no-such-bucket/root': bucket 'no-such-bucket' "
                 "does not exist or is not visible")


def test_vertex_submit_names_missing_flags(tmp_path, capsys):
  assert main(["submit", "smoke", "--target", "vertex-cpu", "--home", str(tmp_path)]) == 2
  assert "needs --project, --region, --pipeline-root" in capsys.readouterr().err
