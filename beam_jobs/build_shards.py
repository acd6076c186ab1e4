"""The shard builder: source records -> plan (image size, patch grid, tokens) -> pack -> decode, patchify and
write deterministic TFRecord shards, with dataset_info.json and errors.jsonl beside them.

  source ──► Plan ──► windows ──► PackWindow ─────────┬──► (split, shard) ──► WriteShard ──► WriteInfo
  (manifest/  (reads    (hash of   first line of an id │      ▲
   synthetic/  headers,  the id)    wins; best-fit      └► tail pool ─► PackTail
   tfds)       checks               decreasing
               files
               whole)

Only metadata travels through the shuffles: the pixels are decoded once, by the worker that writes the shard,
so the job's memory and shuffle volume do not grow with image size. Run it as a library (`build_shards(...)`)
or through `patchflow shards build`. The default runner is Beam's in-process FnApiRunner, named explicitly so
Beam never tries to download a Prism binary; `workers` > 1 runs it with that many worker threads (or processes
with `--direct_running_mode=multi_processing` among the Beam args). Every read
and write goes through Beam's FileSystems, so inputs and outputs may be local paths or gs:// URIs.

The stages are `plan.py`, `pack.py` and `write.py`; how they run on a worker (plans in pickled blobs, the
garbage collector, progress lines) is `runtime.py`. This module composes them (`BuildShards`), summarizes the
shards into dataset_info.json and drives the job (`build_shards`).
"""

import contextlib
import hashlib
import json
import logging
import sys
import time
import uuid
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, TypeOptions

from beam_jobs import text as text_lib
from beam_jobs.options import ShardOptions
from beam_jobs.pack import PackWindow, empty_shard_markers, pack_tail, split_tokens, sum_pairs, window_batches
from beam_jobs.plan import PlanExamples, is_local
from beam_jobs.runtime import NAMESPACE, heap_frozen
from beam_jobs.sources import resolve_source
from beam_jobs.write import WriteShard, token_buckets
from schemas import dataset_info as info_lib
from schemas.errors import ContractError
from schemas.lineage import LINEAGE_FILENAME, fingerprint_path, git_revision
from schemas.packed import FINGERPRINT, SCHEMA_VERSION


class BuildShards(beam.PTransform):
  """{"examples", "errors"} of a source -> shard files; returns {"shards": shard stats, "errors": error rows,
  "labels": the largest label of each window}. Every source record ends as exactly one written image or one
  error row, so the number of records is the sum of the two."""

  def __init__(self, output_dir: str, options: ShardOptions):
    super().__init__()
    self._output_dir, self._options = output_dir, options

  def expand(self, source):
    opts = self._options
    examples, source_errors = source["examples"], source["errors"]
    planned = examples | "Plan" >> beam.ParDo(PlanExamples(opts))  # blobs of plans
    stats = (planned
             | "SplitTokens" >> beam.FlatMap(split_tokens)
             | "SumPerSplit" >> beam.CombinePerKey(sum_pairs))
    stats_side = beam.pvalue.AsDict(stats)
    windows = (planned
               | "KeyByWindow" >> beam.FlatMap(window_batches, stats_side, opts)
               | "GroupByWindow" >> beam.GroupByKey()
               | "PackWindow" >> beam.ParDo(PackWindow(opts), stats_side).with_outputs(
                   "tail", "errors", "labels", main="assigned"))
    tail = (windows.tail
            | "GroupTailBySplit" >> beam.GroupByKey()
            | "PackTail" >> beam.FlatMap(pack_tail, stats_side, opts))
    markers = stats | "EmptyShardMarkers" >> beam.FlatMap(empty_shard_markers, opts)
    written = ((windows.assigned, tail, markers)
               | "AllAssigned" >> beam.Flatten()
               | "GroupByShard" >> beam.GroupByKey()
               | "WriteShard" >> beam.ParDo(WriteShard(self._output_dir, opts)).with_outputs("errors", main="shards"))
    errors = (source_errors, windows.errors, written.errors) | "AllErrors" >> beam.Flatten()
    # One int per window: the maximum is taken where it is used (a CombineGlobally would add ten transforms to
    # every run's start-up for it).
    return {"shards": written.shards, "errors": errors, "labels": windows.labels}


# ------------------------------------------------------------------------------------------------------ summary

def summarize(shards: list[dict[str, Any]], errors: list[dict[str, Any]], num_lines: int, options: ShardOptions,
              num_classes: int, class_names: tuple[str, ...], source: str) -> dict[str, Any]:
  shards = sorted(shards, key=lambda s: s["path"])
  splits: dict[str, dict[str, Any]] = {}
  tokens_hist = [0] * len(token_buckets(options.seq_len))
  images_hist = [0] * (options.max_images + 1)
  for s in shards:
    acc = splits.setdefault(s["split"], {"num_examples": 0, "num_sequences": 0, "num_tokens": 0, "num_shards": 0})
    acc["num_examples"] += s["num_images"]
    acc["num_sequences"] += s["num_sequences"]
    acc["num_tokens"] += s["num_tokens"]
    acc["num_shards"] += 1
    tokens_hist = [a + b for a, b in zip(tokens_hist, s["tokens_per_image"])]
    images_hist = [a + b for a, b in zip(images_hist, s["images_per_sequence"])]
  for acc in splits.values():
    acc["packing_efficiency"] = acc["num_tokens"] / max(1, acc["num_sequences"] * options.seq_len)
  num_sequences = sum(s["num_sequences"] for s in shards)
  real_tokens = sum(s["num_tokens"] for s in shards)
  errors_by_reason: dict[str, int] = {}
  for e in errors:
    errors_by_reason[e["reason"]] = errors_by_reason.get(e["reason"], 0) + 1
  return {
      "schema_version": SCHEMA_VERSION, "fingerprint": FINGERPRINT,
      "seq_len": options.seq_len, "patch_size": options.patch_size, "max_images": options.max_images,
      "text_len": options.text_len, "max_patches_per_image": options.max_patches_per_image,
      "tokenizer": text_lib.describe(options.tokenizer) if options.text_len else None,
      "video": options.video, "max_frames": max((s["max_frames"] for s in shards), default=0),
      "max_actors": max((s["max_actors"] for s in shards), default=0),
      "num_classes": num_classes, "class_names": list(class_names),
      "num_examples": sum(s["num_examples"] for s in splits.values()), "num_sequences": num_sequences,
      "num_manifest_lines": num_lines, "num_errors": len(errors), "errors_by_reason": dict(sorted(errors_by_reason.items())),
      "packing_efficiency": real_tokens / max(1, num_sequences * options.seq_len),
      "tokens_dropped": sum(s["tokens_dropped"] for s in shards),
      "text_tokens_truncated": sum(s["text_tokens_truncated"] for s in shards),
      "histograms": {
          "tokens_per_image": {"bucket_lower_bounds": token_buckets(options.seq_len), "counts": tokens_hist},
          "images_per_sequence": {"images": list(range(options.max_images + 1)), "counts": images_hist},
      },
      "splits": dict(sorted(splits.items())),
      "shards": [{k: s[k] for k in ("path", "split", "sha256", "num_bytes", "crc_digest", "num_sequences",
                                    "num_images", "num_tokens")} for s in shards],
      "source": source, "options": options.to_json(),
  }


def write_info(_, shards, errors, window_labels, output_dir, pending_info, options, class_names, source):
  """Writes errors.jsonl, and dataset_info.json under the temporary name `pending_info`: the driver publishes
  it once the build has passed its checks."""
  errors = sorted(errors, key=lambda e: (e["line"], e["reason"], e["id"] or ""))
  num_lines = sum(s["num_images"] for s in shards) + len(errors)
  num_classes = len(class_names) or max(1, max(window_labels, default=-1) + 1)
  info = summarize(list(shards), errors, num_lines, options, num_classes, class_names, source)
  _write_text(FileSystems.join(output_dir, info_lib.ERRORS_FILENAME),
              "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors))
  with FileSystems.create(pending_info, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(json.dumps(info, indent=1, sort_keys=True).encode("utf-8"))


def _write_text(path: str, text: str) -> None:
  """Writes a small file through FileSystems under a temporary name, then renames it."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
  with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(text.encode("utf-8"))
  FileSystems.rename([tmp], [path])


def _read_text(path: str) -> str:
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read().decode("utf-8")


# ------------------------------------------------------------------------------------------------------- driver

def build_shards(manifest: str, output_dir: str, options: ShardOptions = ShardOptions(),
                 beam_args: list[str] | None = None, workers: int | None = None,
                 tfds_data_dir: str | None = None, manifest_chunk_bytes: int | None = None) -> dict[str, Any]:
  """Runs the whole job; returns dataset_info. `manifest` is a manifest path (local or gs://), `synthetic[:...]`
  or `tfds:NAME`.

  The build is published all at once (docs/shard-format.md, "Publication and verification"): it first removes an earlier build's
  dataset_info.json, lineage.json and errors.jsonl, so that no reader takes the shards being written for the
  earlier ones, and writes dataset_info.json last, naming exactly the shards of this build. A build that fails
  publishes nothing and removes its shards and temporary files: more than `max_error_fraction` bad records (a
  ContractError, errors.jsonl kept as its report), no records, or an error of the job (a full disk is an
  OSError naming the output directory)."""
  kwargs = {"chunk_bytes": manifest_chunk_bytes} if manifest_chunk_bytes else {}
  source = resolve_source(manifest, tfds_data_dir, **kwargs)
  if options.tokenizer:
    text_lib.describe(options.tokenizer)  # a bad model file fails here, before any work, naming the file
  if is_local(output_dir):
    import os
    os.makedirs(output_dir, exist_ok=True)
  runner, pipeline_options = pipeline_runner(beam_args, workers)
  runner_name = type(runner).__name__ if runner else pipeline_options.get_all_options()["runner"]
  mode = pipeline_options.view_as(DirectOptions)
  print(f"build_shards: {source.description} -> {output_dir} (runner {runner_name}"
        + (f", {mode.direct_num_workers} worker(s), {mode.direct_running_mode}" if runner else "") + ")",
        file=sys.stderr, flush=True)
  _unpublish(output_dir)
  pending_info = FileSystems.join(output_dir, f"{info_lib.FILENAME}.tmp-{uuid.uuid4().hex[:12]}")
  try:
    info, seconds = _run_job(source, output_dir, pending_info, options, runner, pipeline_options)
    _check_errors(info, manifest, output_dir, options)
    _cleanup_stale(output_dir, info)
    lineage = {"step": "build_shards", "git_revision": git_revision(), "schema_version": SCHEMA_VERSION,
               "config": {**options.to_json(), "source": source.description, "runner": runner_name,
                          "workers": workers, "beam_args": list(beam_args or [])},
               "inputs": {"manifest": {"path": manifest, "fingerprint": (
                   _input_fingerprint(source.manifest_path) if source.manifest_path else None)}}}
    _write_text(FileSystems.join(output_dir, LINEAGE_FILENAME), json.dumps(lineage, indent=1, sort_keys=True))
    FileSystems.rename([pending_info], [FileSystems.join(output_dir, info_lib.FILENAME)])  # published
  except BaseException as e:
    _remove_build(output_dir, keep_errors=isinstance(e, ContractError))
    cause = None if isinstance(e, ContractError) else _os_error(e)
    if cause is not None:  # a full disk, say: one line naming the directory, from the driver or a worker
      raise OSError(cause.errno, f"{cause.strerror} writing shards; nothing was published", output_dir) from None
    raise
  print(f"build_shards: {info['num_examples']} images -> {info['num_sequences']} sequences in "
        f"{len(info['shards'])} shards, packing efficiency {info['packing_efficiency']:.4f}, "
        f"{info['num_errors']} errors, {seconds:.1f} s", file=sys.stderr, flush=True)
  return info


def _run_job(source, output_dir: str, pending_info: str, options: ShardOptions, runner, pipeline_options):
  """Runs the Beam job; returns (the dataset_info it wrote under `pending_info`, seconds)."""
  start = time.monotonic()
  pipeline = beam.Pipeline(runner=runner, options=pipeline_options)
  outputs = pipeline | "Source" >> source.transform | "BuildShards" >> BuildShards(output_dir, options)
  _ = (pipeline | "Once" >> beam.Create([None])
       | "WriteInfo" >> beam.Map(write_info, beam.pvalue.AsList(outputs["shards"]),
                                 beam.pvalue.AsList(outputs["errors"]), beam.pvalue.AsList(outputs["labels"]),
                                 output_dir, pending_info, options, source.class_names, source.description))
  with heap_frozen(in_process=runner is not None), _worker_tracebacks_unlogged(in_process=runner is not None):
    result = pipeline.run()
    result.wait_until_finish()
  seconds = time.monotonic() - start
  info = info_lib.validate_dataset_info(json.loads(_read_text(pending_info)), pending_info)
  _print_counters(result)
  return info, seconds


@contextlib.contextmanager
def _worker_tracebacks_unlogged(in_process: bool):
  """Beam's in-process runner logs a failing DoFn's traceback, then raises the error to the driver, which
  raises it again (one line for a full disk, the whole traceback for a bug): the log would only repeat it."""
  logger = logging.getLogger("apache_beam.runners.common")
  level = logger.level
  if in_process:
    logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _check_errors(info: dict[str, Any], manifest: str, output_dir: str, options: ShardOptions) -> None:
  if info["num_manifest_lines"] == 0:
    raise ContractError(f"manifest {manifest!r}: no records")
  if info["num_errors"] > options.max_error_fraction * info["num_manifest_lines"]:
    errors_path = FileSystems.join(output_dir, info_lib.ERRORS_FILENAME)
    first = json.loads(_read_text(errors_path).splitlines()[0])
    detail = first["detail"].removeprefix(f"{manifest}:{first['line']}: ")
    raise ContractError(
        f"{info['num_errors']} of {info['num_manifest_lines']} manifest records failed (max_error_fraction "
        f"{options.max_error_fraction}); first: {manifest}:{first['line']}: {first['reason']}: {detail} "
        f"(all in {errors_path}; nothing was published)")


def _os_error(error: BaseException) -> OSError | None:
  """The OSError behind a failure, if any: the in-process runner raises a worker's exception as a RuntimeError
  whose context is the original."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def pipeline_runner(beam_args: list[str] | None, workers: int | None):
  """(runner, PipelineOptions): Beam's in-process FnApiRunner unless the Beam args name a runner."""
  beam_args = list(beam_args or [])
  options = PipelineOptions(beam_args)
  if options.get_all_options().get("runner"):
    if workers and workers > 1:
      print("build_shards: --workers applies to the local runner only; the named runner sizes itself",
            file=sys.stderr)
    return None, options
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  direct = options.view_as(DirectOptions)
  if workers is not None:
    direct.direct_num_workers = workers
    if not any(a.startswith("--direct_running_mode") for a in beam_args):
      # Threads, not processes: the heavy parts (JPEG/PNG decoding, resizing, sha256, file IO) release the GIL,
      # and each worker process would first spend about 3 CPU-seconds importing Beam's SDK harness.
      direct.direct_running_mode = "multi_threading" if workers > 1 else "in_memory"
  if not any(a.startswith(("--pipeline_type_check", "--no_pipeline_type_check")) for a in beam_args):
    # Beam's construction-time type inference costs ~0.07 s of each local run's ~0.4 s start-up and checks
    # nothing these DoFns declare; `-- --pipeline_type_check` turns it back on.
    options.view_as(TypeOptions).pipeline_type_check = False
  return FnApiRunner(), options  # in-process; naming it keeps Beam from fetching a Prism binary.


def _input_fingerprint(path: str) -> str | None:
  if not is_local(path):
    digest = hashlib.sha256()
    digest.update(FileSystems.split(path)[1].encode() + b"\0")
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()
  return fingerprint_path(path)


def _matching(pattern: str) -> list[str]:
  try:
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]
  except Exception:  # noqa: BLE001 - nothing matched.
    return []


def _shard_files(output_dir: str) -> list[str]:
  """Every shard file under output_dir, whole or temporary, of any build."""
  return _matching(FileSystems.join(output_dir, "*", "shard-*-of-*.tfrecord*"))


def _unpublish(output_dir: str) -> None:
  """Removes an earlier build's description (its shards are overwritten or removed as this build goes), so a
  build killed midway leaves a directory that readers refuse instead of old metadata over new shards."""
  described = [FileSystems.join(output_dir, name)
               for name in (info_lib.FILENAME, LINEAGE_FILENAME, info_lib.ERRORS_FILENAME)]
  present = [p for p in described if FileSystems.exists(p)]
  if present:
    FileSystems.delete(present)


def _remove_build(output_dir: str, keep_errors: bool) -> None:
  """After a failed build: its shards, the temporary files of its writers (and of killed runs), its unpublished
  dataset_info and lineage go; errors.jsonl stays when it reports why the build failed."""
  patterns = [info_lib.FILENAME + "*", LINEAGE_FILENAME + "*",
              info_lib.ERRORS_FILENAME + (".tmp-*" if keep_errors else "*")]
  doomed = _shard_files(output_dir) + [p for pattern in patterns
                                       for p in _matching(FileSystems.join(output_dir, pattern))]
  if doomed:
    try:
      FileSystems.delete(sorted(set(doomed)))
    except Exception as e:  # noqa: BLE001 - keep the build's own error; say what could not be removed.
      print(f"build_shards: could not remove every file of the failed build: {e}".splitlines()[0],
            file=sys.stderr)


def _cleanup_stale(output_dir: str, info: dict[str, Any]) -> None:
  """Removes shard files of an earlier build with another shard count, and temporary files of killed runs."""
  keep = {s["path"] for s in info["shards"]}
  stale = [p for p in _shard_files(output_dir) if "/".join(p.split("/")[-2:]) not in keep]
  stale += _matching(FileSystems.join(output_dir, info_lib.ERRORS_FILENAME + ".tmp-*"))
  if stale:
    FileSystems.delete(stale)


def _print_counters(result) -> None:
  try:
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))["counters"]
  except Exception:  # noqa: BLE001 - not every runner reports metrics.
    return
  totals: dict[str, int] = {}
  for c in counters:
    totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
  if totals:
    print("build_shards: counters " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())),
          file=sys.stderr, flush=True)
