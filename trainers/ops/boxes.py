"""Axis-aligned boxes in normalised image coordinates: conversion, area, IoU and generalised IoU (pure JAX).

A box is (ymin, xmin, ymax, xmax) unless a name says otherwise, the order of the manifests and of
`patchflow localisation-metrics`. Every function works elementwise over broadcast leading axes, so a pairwise
table is `iou(a[:, None], b[None, :])`.

IoU follows evaluators/localisation: area(A n B) / area(A u B), and 0 when the union has no area, so a box of
zero area has IoU 0 with every box, itself included. Generalised IoU (Rezatofighi et al. 2019) is
IoU - (area(C) - area(A u B)) / area(C), C the smallest box enclosing both; it equals IoU when C has no area.
Divisions are guarded on both branches of a `jnp.where`, so the gradients stay finite at zero area too.
"""

import jax.numpy as jnp


def center_to_corners(boxes):
  """(cy, cx, h, w) -> (ymin, xmin, ymax, xmax)."""
  center, size = boxes[..., :2], boxes[..., 2:]
  return jnp.concatenate([center - size / 2, center + size / 2], axis=-1)


def box_area(boxes):
  """Area of each box; an inverted side counts as zero."""
  sides = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
  return sides[..., 0] * sides[..., 1]


def _safe_divide(numerator, denominator):
  """numerator / denominator where the denominator is positive, else 0 (with finite gradients)."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _intersection_and_union(a, b):
  low = jnp.maximum(a[..., :2], b[..., :2])
  high = jnp.minimum(a[..., 2:], b[..., 2:])
  intersection = box_area(jnp.concatenate([low, high], axis=-1))
  return intersection, box_area(a) + box_area(b) - intersection


def iou(a, b):
  intersection, union = _intersection_and_union(a, b)
  return _safe_divide(intersection, union)


def generalized_iou(a, b):
  """In [-1, 1]: 1 for identical boxes of positive area, towards -1 for small boxes far apart."""
  intersection, union = _intersection_and_union(a, b)
  enclosing = box_area(jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]),
                                        jnp.maximum(a[..., 2:], b[..., 2:])], axis=-1))
  return _safe_divide(intersection, union) - _safe_divide(enclosing - union, enclosing)
