"""The `patchflow` command.

  patchflow compile smoke --output smoke.yaml     # KFP IR YAML for Vertex AI / Kubeflow
  patchflow run smoke [--set steps=200 ...]       # the whole DAG locally (kfp.local + in-process Beam + JAX CPU)
  patchflow shards build --manifest M --output DIR [--seq-len 256 ...] [--workers 2] [-- <Beam pipeline options>]
  patchflow train --data SHARDS --workdir DIR [--config smoke] [--set train.steps=100 ...]
  patchflow calibrate --predictions PATH.parquet --output DIR   # calibration.json, reliability plots, HTML
  patchflow localisation-metrics --detections D.jsonl --ground-truth G.jsonl --output DIR   # frame/video mAP
  patchflow synthetic actions --output DIR [--seed S --num-train N ...]   # action clips (mp4) + tubelets
  patchflow synthetic action-classes --output DIR [--seed S --num-train N ...]   # clips labelled by action
"""

import argparse
import os
import sys

from beam_jobs.options import add_shard_arguments, shard_options_from_args
from pipelines import registry
from schemas.errors import ContractError


def _compile(args) -> int:
  from kfp import compiler
  from runner.preflight import check_parameters
  pipeline = registry.get_pipeline(args.pipeline, args.target)
  params = registry.parse_parameters(pipeline, args.set)
  check_parameters(pipeline, params)
  # Into a directory made if missing, under a temporary name with the same suffix (kfp picks YAML or JSON by
  # it), then renamed: a failed compile leaves nothing under the final name.
  folder, name = os.path.split(os.path.abspath(args.output))
  try:
    os.makedirs(folder, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise ContractError(f"--output {args.output!r}: a folder above it is a file, not a directory") from None
  tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}{os.path.splitext(name)[1]}")
  try:
    compiler.Compiler().compile(pipeline, tmp, pipeline_parameters=params or None)
    os.replace(tmp, args.output)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  print(f"compiled {args.pipeline} for target {args.target or 'default'} -> {args.output}")
  return 0


def _run(args) -> int:
  pipeline = registry.get_pipeline(args.pipeline)
  params = registry.parse_parameters(pipeline, args.set)
  return _run_and_report(args.pipeline, params, args.home, use_cache=not args.no_cache)


def _rerun(args) -> int:
  from runner import history
  from runner.local_run import runs_home
  home = args.home or runs_home()
  previous = history.get_run(home, args.run_id)
  pipeline = registry.get_pipeline(previous["pipeline"])
  params = {**previous["params"], **registry.parse_parameters(pipeline, args.set)}
  return _run_and_report(previous["pipeline"], params, home, parent=previous["id"], use_cache=not args.no_cache)


def _runs(args) -> int:
  import json
  from runner import history
  from runner.local_run import runs_home
  runs = history.list_runs(args.home or runs_home())
  if args.json:
    print(json.dumps(runs, indent=1, sort_keys=True))
    return 0
  print(f"{'id':34} {'pipeline':10} {'status':11} {'seconds':>8}  report or reason")
  for r in runs:
    seconds = f"{r['duration_seconds']:.1f}" if r.get("duration_seconds") is not None else "-"
    shown = r.get("report") or r.get("console_url") or r.get("reason") or ""
    print(f"{r['id']:34} {r['pipeline']:10} {r['status']:11} {seconds:>8}  {shown}")
  return 0


def _run_and_report(name: str, params: dict, home: str | None, parent: str | None = None,
                    use_cache: bool = True) -> int:
  from runner.local_run import run_pipeline, step_log
  record = run_pipeline(name, params, home=home, parent=parent, use_cache=use_cache)
  if record["status"] == "INTERRUPTED":
    print(f"run {record['id']} INTERRUPTED: {record['reason']}")
    return 128 + record["signal"]
  if record["status"] != "SUCCEEDED":
    step = record.get("failed_step")
    print(record["reason"], file=sys.stderr)
    if step:
      tail = step_log(f"{record['run_dir']}/kfp.log", step)[-25:]
      print("---- last lines of its log ----\n" + "\n".join(tail), file=sys.stderr)
    print(f"run {record['id']} FAILED step={step} log={record['run_dir']}/kfp.log")
    return 1
  print(f"run {record['id']} SUCCEEDED report={record['report']}")
  return 0


def _submit(args) -> int:
  from runner.local_run import runs_home
  from runner.submit import submit
  pipeline = registry.get_pipeline(args.pipeline, args.target)
  params = registry.parse_parameters(pipeline, args.set)
  record = submit(args.pipeline, args.target, params, args.home or runs_home(), project=args.project,
                  region=args.region, pipeline_root=args.pipeline_root, kfp_host=args.kfp_host,
                  enable_caching=not args.no_cache)
  print(f"submitted {record['id']} to {'Kubeflow' if args.kfp_host else 'Vertex AI'}: {record['console_url']}")
  return 0


def _ui(args) -> int:
  from runner.local_run import runs_home
  from runner.ui import serve
  serve(args.home or runs_home(), args.host, args.port)
  return 0


def _shards_build(args) -> int:
  from beam_jobs.build_shards import build_shards
  if args.workers is not None and args.workers < 1:
    raise ContractError(f"--workers must be >= 1, got {args.workers}")
  options = shard_options_from_args(args)
  info = build_shards(args.manifest, args.output, options, beam_args=args.beam_args, workers=args.workers,
                      tfds_data_dir=args.tfds_data_dir)
  print(f"wrote {info['num_sequences']} sequences ({info['num_examples']} images, {info['num_errors']} errors, "
        f"packing efficiency {info['packing_efficiency']:.4f}) to {args.output}")
  return 0


def _train(args) -> int:
  from trainers.train import UnusableModelError
  from trainers.train import main as train_main
  argv = ["--data", args.data, "--workdir", args.workdir, "--config", args.config]
  for assignment in args.set:
    argv += ["--set", assignment]
  try:
    return train_main(argv)
  except UnusableModelError as e:  # trained and saved, but of no use: the run failed, the input was fine
    print(f"patchflow: error: {e}", file=sys.stderr)
    return 1


def _calibrate(args) -> int:
  from evaluators.calibration import calibrate
  calibrate(args.predictions, args.output, log=lambda m: print(m, file=sys.stderr, flush=True))
  print(f"wrote {args.output}/calibration.json, calibration.html and reliability plots")
  return 0


def _localisation_metrics(args) -> int:
  from evaluators.localisation import localisation_metrics
  localisation_metrics(args.detections, args.ground_truth, args.output,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
  print(f"wrote {args.output}/metrics.json")
  return 0


def _synthetic_actions(args) -> int:
  from beam_jobs.synthetic_actions import DEFAULT_SPLITS, generate_action_clips
  summary = generate_action_clips(args.output, **_synthetic_video_options(args, DEFAULT_SPLITS))
  print(f"wrote {_clip_counts(summary)} with {sum(summary['tubes'].values())} tubelets to {args.output}; "
        f"train tubelets per class: {_per_class(summary)}")
  return 0


def _synthetic_action_classes(args) -> int:
  from beam_jobs.synthetic_actions import DEFAULT_CLASS_SPLITS, generate_action_classes
  summary = generate_action_classes(args.output, **_synthetic_video_options(args, DEFAULT_CLASS_SPLITS))
  print(f"wrote {_clip_counts(summary)} to {args.output}; train clips per class: {_per_class(summary)}")
  return 0


def _synthetic_video_options(args, default_splits: dict[str, int]) -> dict:
  """The generator's keyword arguments: those given on the command line, the others left to its defaults."""
  given = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
  options = {"seed": args.seed, "splits": {s: n if given[s] is None else given[s] for s, n in default_splits.items()},
             "log": lambda m: print(m, file=sys.stderr, flush=True)}
  options.update({key: value for key, value in (("frames", args.frames), ("size", args.size)) if value is not None})
  return options


def _clip_counts(summary: dict) -> str:
  clips = summary["clips"]
  return (f"{sum(clips.values())} clips ({', '.join(f'{s} {n}' for s, n in clips.items())}; "
          f"{summary['frames']} frames of {summary['size']}x{summary['size']} px, {summary['num_bytes']} bytes)")


def _per_class(summary: dict) -> str:
  return ", ".join(f"{name} {count}"
                   for name, count in zip(summary["class_names"], summary["class_counts"].get("train", [])))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="patchflow", description="Multimodal pipelines: data -> checkpoint -> report.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("compile", help="compile a pipeline to KFP IR YAML")
  p.add_argument("pipeline", help=f"one of: {', '.join(registry.names())}")
  p.add_argument("--output", required=True, help="path of the YAML to write")
  p.add_argument("--target", default=None, help="runtime target of infra/targets.yaml: image and per-step resources")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter default")
  p.set_defaults(func=_compile)
  p = sub.add_parser("run", help="run a pipeline locally with kfp.local")
  p.add_argument("pipeline", help=f"one of: {', '.join(registry.names())}")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set a pipeline parameter")
  p.add_argument("--home", default=None, help="runs directory (default $PATCHFLOW_HOME or ./runs)")
  p.add_argument("--no-cache", action="store_true", help="run every step even if an identical one ran before")
  p.set_defaults(func=_run)
  p = sub.add_parser("submit", help="submit to Vertex AI Pipelines or a Kubeflow Pipelines host")
  p.add_argument("pipeline", help=f"one of: {', '.join(registry.names())}")
  p.add_argument("--target", required=True, help="runtime target of infra/targets.yaml")
  p.add_argument("--project", help="Vertex AI: Google Cloud project")
  p.add_argument("--region", help="Vertex AI: region, e.g. us-central1")
  p.add_argument("--pipeline-root", help="gs:// root for the run's artifacts")
  p.add_argument("--kfp-host", help="Kubeflow Pipelines endpoint URL (instead of Vertex AI)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set a pipeline parameter")
  p.add_argument("--no-cache", action="store_true", help="disable the backend's step caching")
  p.add_argument("--home", default=None, help="runs directory for the history (default $PATCHFLOW_HOME or ./runs)")
  p.set_defaults(func=_submit)
  p = sub.add_parser("runs", help="list local and submitted runs")
  p.add_argument("--json", action="store_true", help="print a JSON list of run objects")
  p.add_argument("--home", default=None, help="runs directory (default $PATCHFLOW_HOME or ./runs)")
  p.set_defaults(func=_runs)
  p = sub.add_parser("rerun", help="run again with the same (or changed) parameters")
  p.add_argument("run_id")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a parameter")
  p.add_argument("--home", default=None, help="runs directory (default $PATCHFLOW_HOME or ./runs)")
  p.add_argument("--no-cache", action="store_true", help="run every step even if an identical one ran before")
  p.set_defaults(func=_rerun)
  p = sub.add_parser("ui", help="web page over the runs, with Rerun")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8080)
  p.add_argument("--home", default=None, help="runs directory (default $PATCHFLOW_HOME or ./runs)")
  p.set_defaults(func=_ui)
  shards = sub.add_parser("shards", help="packed TFRecord shards").add_subparsers(dest="shards_command", required=True)
  p = shards.add_parser(
      "build", help="manifest -> packed shards + dataset_info.json + errors.jsonl (Apache Beam)",
      description="Everything after `--` goes to Beam as pipeline options, e.g. "
                  "-- --runner DataflowRunner --project P --region R --temp_location gs://B/tmp")
  p.add_argument("--manifest", required=True,
                 help="manifest JSONL (local path or gs://), synthetic[:seed=S,train=N,...] or tfds:NAME[/CONFIG][:VERSION]")
  p.add_argument("--output", required=True, help="shard directory (local path or gs://)")
  add_shard_arguments(p)
  p.add_argument("--workers", type=int, default=None,
                 help="local Beam workers (threads of the in-process runner; default 1)")
  p.add_argument("--tfds-data-dir", default=None, help="TFDS data_dir for a tfds: source")
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
  p = sub.add_parser("localisation-metrics", help="frame-mAP and video-mAP of action tubes (STAR)")
  p.add_argument("--detections", required=True, help="detected tubes, JSONL: video, label, boxes, score")
  p.add_argument("--ground-truth", required=True, help="ground-truth tubes, JSONL: video, label, boxes")
  p.add_argument("--output", required=True, help="directory for metrics.json and lineage.json")
  p.set_defaults(func=_localisation_metrics)
  # Defaults stay in beam_jobs.synthetic_actions (None here: the data set's own), which this parser does not
  # import: PyAV and numpy would slow every other command.
  synthetic = sub.add_parser("synthetic", help="synthetic data sets").add_subparsers(dest="synthetic_command",
                                                                                      required=True)
  for name, func, help_text in (
      ("actions", _synthetic_actions,
       "action localisation clips (mp4): 1-3 actors with tubelets, long-tailed classes, ground truth per split"),
      ("action-classes", _synthetic_action_classes,
       "one-actor clips (mp4) labelled by action, balanced classes (co-finetuning's upstream)")):
    p = synthetic.add_parser(name, help=help_text, description=help_text + ". Defaults: docs/actions.md")
    p.add_argument("--output", required=True, help="directory for videos/, manifest.jsonl, classes.json")
    p.add_argument("--seed", type=int, default=0, help="the same seed and sizes give the same bytes")
    for split in ("train", "val", "test"):
      p.add_argument(f"--num-{split}", type=int, default=None, metavar="N", help=f"{split} clips")
    p.add_argument("--frames", type=int, default=None, metavar="F", help="frames per clip")
    p.add_argument("--size", type=int, default=None, metavar="PX", help="frame side in pixels (even)")
    p.set_defaults(func=func)
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
  except (ContractError, FloatingPointError) as e:
    print(f"patchflow: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # the environment, not the input: a full disk, a missing or unwritable directory
    print(f"patchflow: error: {e}".splitlines()[0], file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
