"""Figures for the report, returned as PNG bytes so the HTML can embed them and stand alone."""

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
  buffer = io.BytesIO()
  # No timestamps in the PNG metadata, so the same figures give the same bytes.
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
  plt.close(fig)
  return buffer.getvalue()


def reliability_diagram(reliability: dict, title: str) -> bytes:
  edges = np.asarray(reliability["edges"])
  accuracy = np.asarray(reliability["accuracy"], dtype=float)
  confidence = np.asarray(reliability["confidence"], dtype=float)
  centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
  fig, ax = plt.subplots(figsize=(4, 4))
  filled = ~np.isnan(accuracy)
  ax.bar(centers[filled], accuracy[filled], width=width, edgecolor="black", color="#4c72b0", label="accuracy")
  ax.bar(centers[filled], confidence[filled] - accuracy[filled], bottom=accuracy[filled], width=width,
         color="#dd8452", alpha=0.5, edgecolor="#dd8452", label="gap to confidence")
  ax.plot([0, 1], [0, 1], "k--", linewidth=1)
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
  ax.legend(loc="upper left", fontsize=8)
  return _png(fig)


def training_curve(rows: list[dict]) -> bytes:
  steps = [r["step"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 3))
  ax.plot(steps, [r["loss"] for r in rows], marker="o", markersize=3, label="train loss")
  ax.set(xlabel="step", ylabel="loss", title="Training curve")
  ax2 = ax.twinx()
  ax2.plot(steps, [r["accuracy"] for r in rows], color="#55a868", marker="s", markersize=3,
           label="train batch accuracy")
  ax2.set(ylabel="accuracy", ylim=(0, 1.02))
  fig.legend(loc="center right", fontsize=8, bbox_to_anchor=(0.85, 0.5))
  return _png(fig)


def accuracy_and_ece_under_shift(per_split: dict) -> bytes:
  names = list(per_split)
  fig, ax = plt.subplots(figsize=(5, 3))
  x = np.arange(len(names))
  ax.bar(x - 0.2, [per_split[n]["accuracy"] for n in names], width=0.4, label="accuracy")
  ax.bar(x + 0.2, [per_split[n]["ece"] for n in names], width=0.4, label="ECE (15 bins)")
  ax.set_xticks(x, names, rotation=20)
  ax.set(ylim=(0, 1), title="Accuracy and calibration per split")
  ax.legend(fontsize=8)
  return _png(fig)
