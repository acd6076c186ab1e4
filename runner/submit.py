"""`patchflow submit`: the compiled pipeline to Vertex AI Pipelines (google-cloud-aiplatform PipelineJob) or
to a Kubeflow Pipelines host (kfp.Client), recorded in the run history with its console link."""

import os
import tempfile
import time

from pipelines import registry
from runner import history
from runner.local_run import new_run_id
from runner.preflight import check_parameters
from schemas.errors import ContractError
from schemas.lineage import git_revision


def compile_to(pipeline_name: str, target: str, path: str) -> None:
  from kfp import compiler
  compiler.Compiler().compile(registry.get_pipeline(pipeline_name, target), path)


def check_bucket(uri: str, project: str | None = None) -> None:
  """A gs:// pipeline root must name an existing bucket: fail here, not an hour into the run."""
  if not uri.startswith("gs://"):
    raise ContractError(f"--pipeline-root {uri!r}: must be a gs:// URI for remote runs")
  bucket = uri[len("gs://"):].split("/", 1)[0]
  from google.cloud import storage
  client = storage.Client(project=project) if not os.environ.get("STORAGE_EMULATOR_HOST") else \
      storage.Client(project=project or "test", credentials=_anonymous())
  if client.lookup_bucket(bucket) is None:
    raise ContractError(f"--pipeline-root {uri!r}: bucket {bucket!r} does not exist or is not visible")


def _anonymous():
  from google.auth.credentials import AnonymousCredentials
  return AnonymousCredentials()


def build_vertex_job(pipeline_name: str, target: str, project: str, region: str, pipeline_root: str,
                     params: dict, run_id: str, template_dir: str, enable_caching: bool = True, credentials=None):
  """The PipelineJob exactly as it would be submitted (template, parameters, labels, caching)."""
  from google.cloud import aiplatform
  template = os.path.join(template_dir, f"{pipeline_name}-{target}.yaml")
  compile_to(pipeline_name, target, template)
  revision = git_revision().replace("+", "-")[:40]
  return aiplatform.PipelineJob(
      display_name=f"patchflow-{pipeline_name}", template_path=template, job_id=run_id,
      pipeline_root=pipeline_root, parameter_values=params, enable_caching=enable_caching,
      labels={"patchflow-pipeline": pipeline_name, "patchflow-target": target, "patchflow-revision": revision.lower()},
      project=project, location=region, credentials=credentials)


def vertex_console_url(project: str, region: str, run_id: str) -> str:
  return f"https://console.cloud.google.com/vertex-ai/locations/{region}/pipelines/runs/{run_id}?project={project}"


def submit(pipeline_name: str, target: str, params: dict, home: str, *, project: str | None = None,
           region: str | None = None, pipeline_root: str | None = None, kfp_host: str | None = None,
           enable_caching: bool = True) -> dict:
  """Submits one run; returns its history record (id, console_url)."""
  pipeline = registry.get_pipeline(pipeline_name, target)
  check_parameters(pipeline, params)
  defaults = {k: d for k, (_, d) in registry.signature(pipeline).items()}
  run_id = new_run_id(pipeline_name)
  record = {"id": run_id, "pipeline": pipeline_name, "params": {**defaults, **params}, "status": "SUBMITTED",
            "started": time.time(), "target": target, "pipeline_root": pipeline_root, "steps": {}}
  with tempfile.TemporaryDirectory() as tmp:
    if kfp_host:
      import kfp
      template = os.path.join(tmp, f"{pipeline_name}-{target}.yaml")
      compile_to(pipeline_name, target, template)
      client = kfp.Client(host=kfp_host)
      result = client.create_run_from_pipeline_package(
          template, arguments=params, run_name=run_id, experiment_name="patchflow", enable_caching=enable_caching,
          **({"pipeline_root": pipeline_root} if pipeline_root else {}))
      record["remote_id"] = result.run_id
      record["console_url"] = f"{kfp_host.rstrip('/')}/#/runs/details/{result.run_id}"
    else:
      missing = [flag for flag, value in (("--project", project), ("--region", region),
                                          ("--pipeline-root", pipeline_root)) if not value]
      if missing:
        raise ContractError(f"submit to Vertex AI needs {', '.join(missing)} (or --kfp-host URL for Kubeflow)")
      check_bucket(pipeline_root, project)
      job = build_vertex_job(pipeline_name, target, project, region, pipeline_root, params, run_id, tmp,
                             enable_caching)
      job.submit()
      record["console_url"] = vertex_console_url(project, region, run_id)
  history.save_run(home, record)
  return record
