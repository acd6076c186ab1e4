"""The `patchflow` command.

  patchflow compile smoke --output smoke.yaml     # KFP IR YAML for Vertex AI / Kubeflow
  patchflow run smoke [--set steps=200 ...]       # the whole DAG locally (kfp.local + in-process Beam + JAX CPU)
"""

import argparse
import sys

from pipelines import registry
from schemas.errors import ContractError


def _compile(args) -> int:
  from kfp import compiler
  pipeline = registry.get_pipeline(args.pipeline)
  params = registry.parse_parameters(pipeline, args.set)
  compiler.Compiler().compile(pipeline, args.output, pipeline_parameters=params or None)
  print(f"compiled {args.pipeline} -> {args.output}")
  return 0


def _run(args) -> int:
  from pipelines.local_run import run_pipeline, step_log
  pipeline = registry.get_pipeline(args.pipeline)
  params = registry.parse_parameters(pipeline, args.set)
  record = run_pipeline(args.pipeline, params, home=args.home)
  if record["status"] != "SUCCEEDED":
    step = record.get("failed_step")
    why = record["steps"].get(step, {}).get("why", "the pipeline process failed") if step else "see the log"
    print(f"step {step!r} FAILED: {why}", file=sys.stderr)
    if step:
      tail = step_log(f"{record['run_dir']}/kfp.log", step)[-40:]
      print("---- last lines of its log ----\n" + "\n".join(tail), file=sys.stderr)
    print(f"run {record['id']} FAILED step={step} log={record['run_dir']}/kfp.log")
    return 1
  print(f"run {record['id']} SUCCEEDED report={record['report']}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="patchflow", description="Multimodal pipelines: data -> checkpoint -> report.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("compile", help="compile a pipeline to KFP IR YAML")
  p.add_argument("pipeline", help=f"one of: {', '.join(registry.names())}")
  p.add_argument("--output", required=True, help="path of the YAML to write")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter default")
  p.set_defaults(func=_compile)
  p = sub.add_parser("run", help="run a pipeline locally with kfp.local")
  p.add_argument("pipeline", help=f"one of: {', '.join(registry.names())}")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set a pipeline parameter")
  p.add_argument("--home", default=None, help="runs directory (default $PATCHFLOW_HOME or ./runs)")
  p.set_defaults(func=_run)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except ContractError as e:
    print(f"patchflow: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
