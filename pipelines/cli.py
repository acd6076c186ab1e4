"""The `patchflow` command.

  patchflow compile smoke --output smoke.yaml     # KFP IR YAML for Vertex AI / Kubeflow
  patchflow run smoke [--set steps=200 ...]       # the whole DAG locally (kfp.local + in-process Beam + JAX CPU)
  patchflow shards build --manifest M --output DIR [--seq-len 256 ...] [-- <Beam pipeline options>]
  patchflow train --data SHARDS --workdir DIR [--config smoke] [--set train.steps=100 ...]
  patchflow calibrate --predictions PATH.parquet --output DIR   # calibration.json, reliability plots, HTML
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
  from pipelines.local_run import last_error_line, run_pipeline, step_log
  pipeline = registry.get_pipeline(args.pipeline)
  params = registry.parse_parameters(pipeline, args.set)
  record = run_pipeline(args.pipeline, params, home=args.home)
  if record["status"] != "SUCCEEDED":
    step = record.get("failed_step")
    why = record["steps"].get(step, {}).get("why", "the pipeline process failed") if step else "see the log"
    error = last_error_line(f"{record['run_dir']}/kfp.log", step) if step else None
    why = error or why
    print(f"step {step!r} FAILED: {why}", file=sys.stderr)
    if step:
      tail = step_log(f"{record['run_dir']}/kfp.log", step)[-25:]
      print("---- last lines of its log ----\n" + "\n".join(tail), file=sys.stderr)
    print(f"run {record['id']} FAILED step={step} log={record['run_dir']}/kfp.log")
    return 1
  print(f"run {record['id']} SUCCEEDED report={record['report']}")
  return 0


def _shards_build(args) -> int:
  from beam_jobs.build_shards import ShardOptions, build_shards
  options = ShardOptions(seq_len=args.seq_len, patch_size=args.patch_size, max_images=args.max_images,
                         max_patches_per_image=args.max_patches_per_image, num_shards=args.num_shards,
                         max_error_fraction=args.max_error_fraction)
  info = build_shards(args.manifest, args.output, options, beam_args=args.beam_args)
  print(f"wrote {info['num_sequences']} sequences ({info['num_examples']} images, {info['num_errors']} errors) "
        f"to {args.output}")
  return 0


def _train(args) -> int:
  from trainers.train import main as train_main
  argv = ["--data", args.data, "--workdir", args.workdir, "--config", args.config]
  for assignment in args.set:
    argv += ["--set", assignment]
  return train_main(argv)


def _calibrate(args) -> int:
  from evaluators.calibration import calibrate
  calibrate(args.predictions, args.output, log=lambda m: print(m, file=sys.stderr, flush=True))
  print(f"wrote {args.output}/calibration.json, calibration.html and reliability plots")
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
  shards = sub.add_parser("shards", help="packed TFRecord shards").add_subparsers(dest="shards_command", required=True)
  p = shards.add_parser("build", help="manifest -> packed shards + dataset_info.json + errors.jsonl (Apache Beam)")
  p.add_argument("--manifest", required=True)
  p.add_argument("--output", required=True)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--patch-size", type=int, default=16)
  p.add_argument("--max-images", type=int, default=16)
  p.add_argument("--max-patches-per-image", type=int, default=64)
  p.add_argument("--num-shards", type=int, default=2)
  p.add_argument("--max-error-fraction", type=float, default=0.01)
  p.set_defaults(func=_shards_build)
  p = sub.add_parser("train", help="train a model on packed shards")
  p.add_argument("--data", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--config", default="smoke")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.set_defaults(func=_train)
  p = sub.add_parser("calibrate", help="calibration and uncertainty metrics of a predictions table")
  p.add_argument("--predictions", required=True, help="predictions Parquet file (local path or gs://...)")
  p.add_argument("--output", required=True, help="directory for calibration.json, plots and calibration.html")
  p.set_defaults(func=_calibrate)
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Everything after `--` belongs to Beam (e.g. -- --runner DataflowRunner --project ...).
  beam_args = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  args = build_parser().parse_args(argv)
  args.beam_args = beam_args
  try:
    return args.func(args)
  except ContractError as e:
    print(f"patchflow: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
