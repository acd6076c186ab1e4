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


def _draw_reliability(ax, reliability: dict, title: str) -> None:
  edges = np.asarray(reliability["edges"])
  accuracy = np.asarray(reliability["accuracy"], dtype=float)
  confidence = np.asarray(reliability["confidence"], dtype=float)
  centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
  filled = ~np.isnan(accuracy)
  ax.bar(centers[filled], accuracy[filled], width=width, edgecolor="black", color="#4c72b0", label="accuracy")
  ax.bar(centers[filled], confidence[filled] - accuracy[filled], bottom=accuracy[filled], width=width,
         color="#dd8452", alpha=0.5, edgecolor="#dd8452", label="gap to confidence")
  ax.plot([0, 1], [0, 1], "k--", linewidth=1)
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
  ax.legend(loc="upper left", fontsize=8)


def reliability_diagram(reliability: dict, title: str) -> bytes:
  fig, ax = plt.subplots(figsize=(4, 4))
  _draw_reliability(ax, reliability, title)
  return _png(fig)


def reliability_pair(left: dict, right: dict, left_title: str, right_title: str) -> bytes:
  """Two reliability diagrams side by side (e.g. before and after temperature scaling)."""
  fig, axes = plt.subplots(1, 2, figsize=(8, 4))
  _draw_reliability(axes[0], left, left_title)
  _draw_reliability(axes[1], right, right_title)
  return _png(fig)


def selective_prediction(curve: dict, title: str = "Selective prediction") -> bytes:
  fig, ax = plt.subplots(figsize=(4, 3))
  ax.plot(curve["coverage"], curve["accuracy"], marker="o", markersize=3)
  ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="coverage (most confident first)", ylabel="accuracy",
         title=f"{title} (area {curve['area_under_curve']:.3f})")
  ax.grid(alpha=0.3)
  return _png(fig)


def ece_vs_accuracy(points: list[dict], title: str = "ECE vs accuracy") -> bytes:
  """Minderer et al. style scatter: one marker per (model, evaluation set); `points` hold name, shift,
  accuracy, ece. Points of one model are joined from in-distribution to the strongest shift."""
  fig, ax = plt.subplots(figsize=(6, 4.5))
  shifts = sorted({p["shift"] for p in points}, key=lambda s: (s != "none", s))
  markers = dict(zip(shifts, "os^Dvp*hX"))
  names = list(dict.fromkeys(p["name"] for p in points))
  colors = plt.get_cmap("tab10")
  for i, name in enumerate(names):
    mine = sorted((p for p in points if p["name"] == name), key=lambda p: shifts.index(p["shift"]))
    ax.plot([p["accuracy"] for p in mine], [p["ece"] for p in mine], color=colors(i % 10), alpha=0.4, linewidth=1)
    for p in mine:
      ax.scatter(p["accuracy"], p["ece"], color=colors(i % 10), marker=markers.get(p["shift"], "o"), s=30,
                 label=name if p is mine[0] else None)
  for shift in shifts:
    ax.scatter([], [], color="grey", marker=markers.get(shift, "o"), label=f"shift: {shift}")
  ax.set(xlabel="accuracy", ylabel="ECE (15 bins)", title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
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


def loss_curves(rows: list[dict], keys: tuple[str, ...], title: str = "Training curve") -> bytes:
  """The logged train losses `keys` (those the rows carry) against the step."""
  steps = [r["step"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 3))
  for key in keys:
    if rows and key in rows[0]:
      ax.plot(steps, [r[key] for r in rows], marker="o", markersize=3, label=key.replace("_", " "))
  ax.set(xlabel="step", ylabel="loss", title=title)
  ax.legend(fontsize=8)
  return _png(fig)


def tubelet_frames(clips: list[dict]) -> bytes:
  """A grid of frames, one row per clip, with boxes: true tubes in green, detected ones in red with their label
  and score. clips: [{"title": str, "frames": [{"image": uint8 [H, W, 3], "t": source frame index,
  "truth": [(name, box)], "detected": [(name, score, box)]}]}], boxes (ymin, xmin, ymax, xmax) in [0, 1]."""
  columns = max(len(clip["frames"]) for clip in clips)
  fig, axes = plt.subplots(len(clips), columns, figsize=(2.4 * columns, 2.6 * len(clips)), squeeze=False)
  for row, clip in zip(axes, clips):
    for ax in row:
      ax.axis("off")
    for ax, frame in zip(row, clip["frames"]):
      height, width = frame["image"].shape[:2]
      ax.imshow(frame["image"], interpolation="nearest")
      ax.set_title(f"{clip['title']} t={frame['t']}", fontsize=8)

      def draw(box, color, text, below):  # truth labelled under its box, detections above, so both stay legible
        ymin, xmin, ymax, xmax = box
        ax.add_patch(plt.Rectangle((xmin * width - 0.5, ymin * height - 0.5), (xmax - xmin) * width,
                                   (ymax - ymin) * height, fill=False, edgecolor=color, linewidth=1.5))
        ax.text(xmin * width, (ymax if below else ymin) * height, text, color="white", fontsize=6,
                va="top" if below else "bottom", bbox={"facecolor": color, "alpha": 0.7, "pad": 0.5, "linewidth": 0})
      for name, box in frame["truth"]:
        draw(box, "#1a7f37", name, below=True)
      for name, score, box in frame["detected"]:
        draw(box, "#c62828", f"{name} {score:.2f}", below=False)
  return _png(fig)
