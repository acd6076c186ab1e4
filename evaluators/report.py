"""report.html: one self-contained page (figures embedded as PNG) from the artifacts of one run."""

import base64
import html
import json
import os

from evaluators import plots
from schemas.lineage import LINEAGE_FILENAME

_STYLE = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.ok{color:#1a7f37}.bad{color:#c62828}
pre{background:#f6f8fa;padding:.6em;overflow:auto;font-size:12px}img{max-width:100%}"""


def _img(png: bytes, alt: str) -> str:
  return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list]) -> str:
  def cell(v):
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def render_report(shard_dir: str, train_workdir: str, eval_dir: str, output_path: str,
                  calibration_dir: str | None = None) -> dict:
  """Writes the report; returns the summary it states (validation accuracy, chance, ratio). With
  calibration_dir (the output of `patchflow calibrate`), its calibration.html is embedded."""
  info = _read_json(os.path.join(shard_dir, "dataset_info.json"))
  final = _read_json(os.path.join(train_workdir, "final.json"))
  metrics = _read_json(os.path.join(eval_dir, "metrics.json"))
  with open(os.path.join(train_workdir, "metrics.jsonl"), encoding="utf-8") as f:
    curve = [json.loads(line) for line in f if line.strip()]
  per_split = metrics["splits"]
  chance = metrics["chance_accuracy"]
  val = per_split.get("val") or next(iter(per_split.values()))
  ratio = val["accuracy"] / chance
  summary = {"val_accuracy": val["accuracy"], "chance_accuracy": chance, "accuracy_over_chance": ratio}

  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>patchflow report</title>"
           f"<style>{_STYLE}</style></head><body><h1>patchflow smoke report</h1>"]
  verdict = "ok" if ratio >= 3 else "bad"
  parts.append(f"<p class='{verdict}'><b>Validation accuracy {val['accuracy']:.3f} = {ratio:.1f}x chance "
               f"({chance:.3f}, {metrics['num_classes']} classes)</b></p>")

  parts.append("<h2>Dataset and packing</h2>")
  parts.append(_table(["split", "images", "sequences", "real tokens"], [
      [s, v["num_examples"], v["num_sequences"], v["num_tokens"]] for s, v in info["splits"].items()]))
  parts.append(_table(["seq_len", "patch_size", "max images / sequence", "max patches / image",
                       "packing efficiency", "tokens dropped", "errors", "schema fingerprint"], [[
      info["seq_len"], info["patch_size"], info["max_images"], info.get("max_patches_per_image", ""),
      info["packing_efficiency"], info["tokens_dropped"], info["num_errors"], info["fingerprint"]]]))

  parts.append("<h2>Training</h2>")
  parts.append(f"<p>{final['step']} steps, final train loss {final['loss']:.4f}, "
               f"parameters sha256 <code>{final['params_sha256'][:16]}</code></p>")
  parts.append(_img(plots.training_curve(curve), "training curve"))

  parts.append("<h2>Metrics per split</h2><p>ECE: top-label, 15 equal-width bins, L1. Brier: sum over classes, "
               "mean over examples.</p>")
  parts.append(_table(["split", "shift", "images", "accuracy", "NLL", "Brier", "ECE"], [
      [s, m["shift"], m["num_examples"], m["accuracy"], m["nll"], m["brier"], m["ece"]]
      for s, m in per_split.items()]))
  parts.append(_img(plots.accuracy_and_ece_under_shift(per_split), "accuracy and ECE per split"))

  parts.append("<h2>Reliability</h2>")
  for split in [s for s in ("val", "test") if s in per_split] + [s for s in per_split if s.startswith("test-")][-1:]:
    parts.append(_img(plots.reliability_diagram(per_split[split]["reliability"],
                                                f"{split} (ECE {per_split[split]['ece']:.3f})"),
                      f"reliability diagram {split}"))

  if calibration_dir:
    with open(os.path.join(calibration_dir, "calibration.html"), encoding="utf-8") as f:
      parts.append("<h2>Calibration</h2>" + f.read())

  sources = [("shards", shard_dir), ("checkpoint", train_workdir), ("evaluation", eval_dir)]
  parts += lineage_parts(sources + ([("calibration", calibration_dir)] if calibration_dir else []))
  write_page(parts, output_path)
  return summary


def lineage_parts(sources: list[tuple[str, str]]) -> list[str]:
  """A report's lineage section: the lineage.json of each (name, artifact directory) that has one."""
  parts = ["<h2>Lineage</h2>"]
  for name, directory in sources:
    path = os.path.join(directory, LINEAGE_FILENAME)
    if os.path.exists(path):
      parts.append(f"<h3>{name}</h3><pre>{html.escape(json.dumps(_read_json(path), indent=1, sort_keys=True))}</pre>")
  return parts


def write_page(parts: list[str], output_path: str) -> None:
  """The page's parts, closed and joined, written to a temporary name and renamed to output_path."""
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path + ".tmp", "w", encoding="utf-8") as f:
    f.write("\n".join(parts + ["</body></html>"]))
  os.replace(output_path + ".tmp", output_path)
