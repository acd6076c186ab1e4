import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.optimize import linear_sum_assignment

from beam_jobs.image_ops import patchify
from beam_jobs.synthetic_actions import actor_boxes, plan_action_clips, render_frames
from trainers.configs import load_config
from trainers.ops.boxes import center_to_corners, generalized_iou, iou
from trainers.star import STAR, assign, match, predict_tubelets, star_loss

# Tested jitted, as a train step runs them (and one compiled program beats many eager ops on CPU).
iou, generalized_iou, match, star_loss = (jax.jit(f) for f in (iou, generalized_iou, match, star_loss))

NUM_CLASSES = 8
PATCH, SIZE, SOURCE_FRAMES, FRAMES = 8, 32, 16, 8  # clips of 16 frames, every other one sampled
MAX_VIDEOS, MAX_ACTORS = 3, 3  # the third slot stays empty


# ------------------------------------------------------------------------------------------------ boxes

def test_iou_and_giou_hand_cases():
  unit = jnp.array([0.0, 0.0, 1.0, 1.0])
  cases = {  # name: (a, b, IoU, GIoU)
      "identical": (unit, unit, 1.0, 1.0),
      "disjoint": (unit, jnp.array([2.0, 2.0, 3.0, 3.0]), 0.0, -7 / 9),  # union 2, enclosing 9
      "nested": (jnp.array([0.0, 0.0, 2.0, 2.0]), jnp.array([0.5, 0.5, 1.5, 1.5]), 0.25, 0.25),
      "half_overlap": (unit, jnp.array([0.0, 0.5, 1.0, 1.5]), 1 / 3, 1 / 3),  # the enclosing box is the union
      "zero_area_itself": (jnp.array([0.5, 0.5, 0.5, 0.5]),) * 2 + (0.0, 0.0),
      "zero_area_inside": (jnp.array([0.5, 0.5, 0.5, 0.5]), unit, 0.0, 0.0),
      "zero_area_outside": (jnp.array([2.0, 2.0, 2.0, 2.0]), unit, 0.0, -3 / 4),  # enclosing 4, union 1
  }
  for name, (a, b, want_iou, want_giou) in cases.items():
    assert float(iou(a, b)) == pytest.approx(want_iou, abs=1e-6), name
    assert float(generalized_iou(a, b)) == pytest.approx(want_giou, abs=1e-6), name
    assert float(generalized_iou(b, a)) == pytest.approx(want_giou, abs=1e-6), name
  # Elementwise over broadcast axes, and finite gradients where areas vanish.
  boxes = jnp.stack([v[0] for v in cases.values()])
  assert generalized_iou(boxes[:, None], boxes[None, :]).shape == (len(cases), len(cases))
  grads = jax.grad(lambda a: generalized_iou(a, a).sum() + iou(a, boxes[::-1]).sum())(boxes)
  assert np.isfinite(np.asarray(grads)).all()
  np.testing.assert_allclose(center_to_corners(jnp.array([0.5, 0.4, 0.2, 0.6])), [0.4, 0.1, 0.6, 0.7], atol=1e-6)


# ------------------------------------------------------------------------------------------------ matching, loss

def _perfect_outputs(batch, num_queries, query_of_actor):
  """Outputs whose query query_of_actor[a] predicts actor a exactly (label, boxes, frames); others "no action"."""
  labels, present = batch["tube_labels"][0, 0], batch["tube_present"][0, 0]
  frames = present.shape[-1]
  logits = np.full((1, 1, num_queries, frames, NUM_CLASSES + 1), -20.0, np.float32)
  logits[..., NUM_CLASSES] = 20.0
  boxes = np.tile(np.float32([0.0, 0.0, 0.1, 0.1]), (1, 1, num_queries, frames, 1))
  for a, q in enumerate(query_of_actor):
    logits[0, 0, q, :, labels[a]] = 20.0
    logits[0, 0, q, :, NUM_CLASSES] = np.where(present[a], -20.0, 40.0)
    boxes[0, 0, q] = batch["tube_boxes"][0, 0, a]
  return {"logits": jnp.asarray(logits), "boxes": jnp.asarray(boxes), "slots": jnp.ones((1, 1), bool)}


def _hand_batch():
  """One slot, 4 frames: actor 0 (label 3) on frames 0-3, actor 1 (label 5) on frames 1-2, a padding actor."""
  boxes = np.zeros((1, 1, 3, 4, 4), np.float32)
  boxes[0, 0, 0] = [0.1, 0.1, 0.4, 0.4]
  boxes[0, 0, 1] = [0.5, 0.6, 0.9, 0.8]
  boxes[0, 0, 2] = [0.2, 0.2, 0.3, 0.3]
  present = np.zeros((1, 1, 3, 4), bool)
  present[0, 0, 0] = True
  present[0, 0, 1, 1:3] = True
  present[0, 0, 2] = True  # present, but a padding actor: never matched
  return {"tube_boxes": jnp.asarray(boxes), "tube_present": jnp.asarray(present),
          "tube_labels": jnp.asarray([[[3, 5, -1]]], jnp.int32)}


def test_matching_finds_the_obvious_assignment_and_never_a_padding_actor():
  batch = _hand_batch()
  outputs = _perfect_outputs(batch, num_queries=5, query_of_actor=[3, 1])
  # A third query predicts the padding actor perfectly; it must still stay unmatched.
  outputs["boxes"] = outputs["boxes"].at[0, 0, 4].set(batch["tube_boxes"][0, 0, 2])
  np.testing.assert_array_equal(match(outputs, batch), [[[3, 1, -1]]])
  # An empty slot matches nothing.
  empty = {**outputs, "slots": jnp.zeros((1, 1), bool)}
  np.testing.assert_array_equal(match(empty, batch), [[[-1, -1, -1]]])


@pytest.mark.parametrize("num_queries, num_actors", [(5, 3), (2, 3), (8, 1)])
def test_assign_finds_the_least_cost_matching_as_scipy_does(num_queries, num_actors):
  rng = np.random.default_rng(0)
  cost = rng.normal(size=(6, 4, num_queries, num_actors)).astype(np.float32)
  matchable = rng.random((6, 4, num_actors)) < 0.7
  assigned = np.asarray(jax.jit(assign)(cost, matchable))
  for b, m in np.ndindex(matchable.shape[:2]):
    actors = np.flatnonzero(matchable[b, m])
    np.testing.assert_array_equal(assigned[b, m, ~matchable[b, m]], -1)
    queries = assigned[b, m, actors]
    rows, columns = linear_sum_assignment(cost[b, m][:, actors])
    assert (queries >= 0).sum() == len(rows) and len(set(queries[queries >= 0])) == len(rows)
    got = sum(cost[b, m, q, a] for q, a in zip(queries, actors) if q >= 0)
    np.testing.assert_allclose(got, cost[b, m][:, actors][rows, columns].sum(), rtol=1e-5)


def test_loss_is_minimal_for_a_perfect_prediction_and_grows_when_it_is_off():
  batch = _hand_batch()
  perfect = _perfect_outputs(batch, num_queries=5, query_of_actor=[3, 1])
  loss, metrics = star_loss(perfect, batch)
  assert float(loss) < 1e-6 and float(metrics["matched"]) == 2
  shifted = {**perfect, "boxes": perfect["boxes"] + 0.05}
  wrong_frames = {**perfect, "logits": perfect["logits"].at[0, 0, 1, 0, NUM_CLASSES].set(-40.0)}  # shows actor 1 on frame 0
  actions, no_action = perfect["logits"][..., :NUM_CLASSES], perfect["logits"][..., NUM_CLASSES:]
  wrong_label = {**perfect, "logits": jnp.concatenate([jnp.roll(actions, 1, axis=-1), no_action], -1)}
  for name, outputs in {"shifted": shifted, "wrong_frames": wrong_frames, "wrong_label": wrong_label}.items():
    assert float(star_loss(outputs, batch)[0]) > 0.1, name


def test_predict_tubelets_reads_back_a_perfect_prediction():
  batch = _hand_batch()
  outputs = _perfect_outputs(batch, num_queries=5, query_of_actor=[3, 1])
  [[detections]] = predict_tubelets(outputs, score_threshold=0.5)
  detections.sort(key=lambda d: d["label"])  # equal scores (1.0), so any order
  assert [(d["label"], [box[0] for box in d["boxes"]]) for d in detections] == [(3, [0, 1, 2, 3]), (5, [1, 2])]
  assert all(d["score"] == pytest.approx(1.0) for d in detections)
  np.testing.assert_allclose(detections[1]["boxes"][0][1:], [0.5, 0.6, 0.9, 0.8], rtol=1e-6)
  assert predict_tubelets(outputs, score_threshold=1.1) == [[[]]]
  assert predict_tubelets({**outputs, "slots": jnp.zeros((1, 1), bool)}, score_threshold=0.0) == [[[]]]


# ------------------------------------------------------------------------------------------------ the model

def _clip_batch(num_clips=2, seed=0):
  """`num_clips` synthetic clips packed in one row (then 16 padding tokens), with their tubes per slot."""
  plans = plan_action_clips(seed=seed, splits={"train": num_clips}, frames=SOURCE_FRAMES, size=SIZE)
  stride = SOURCE_FRAMES // FRAMES
  patches, patch_yx, patch_t, segment_ids = [], [], [], []
  boxes = np.zeros((1, MAX_VIDEOS, MAX_ACTORS, FRAMES, 4), np.float32)
  present = np.zeros((1, MAX_VIDEOS, MAX_ACTORS, FRAMES), bool)
  labels = np.full((1, MAX_VIDEOS, MAX_ACTORS), -1, np.int32)
  for slot, plan in enumerate(plans):
    for f, frame in enumerate(render_frames(plan)[::stride]):
      frame_patches, frame_yx = patchify(frame, PATCH)
      patches.append(frame_patches)
      patch_yx.append(frame_yx)
      patch_t.append(np.full(len(frame_patches), f))
      segment_ids.append(np.full(len(frame_patches), slot + 1))
    for a, actor in enumerate(plan.actors):
      labels[0, slot, a] = actor.label
      for t, *box in actor_boxes(actor, SIZE):
        if t % stride == 0:
          boxes[0, slot, a, t // stride] = box
          present[0, slot, a, t // stride] = True
  padding = 16
  return {"patches": np.concatenate(patches + [np.zeros((padding, PATCH * PATCH * 3), np.uint8)])[None],
          "patch_yx": np.concatenate(patch_yx + [np.zeros((padding, 2), np.int32)]).astype(np.int32)[None],
          "patch_t": np.concatenate(patch_t + [np.zeros(padding)]).astype(np.int32)[None],
          "segment_ids": np.concatenate(segment_ids + [np.zeros(padding)]).astype(np.int32)[None],
          "tube_boxes": boxes, "tube_present": present, "tube_labels": labels}


@pytest.fixture(scope="module")
def clips():
  return _clip_batch()


CONFIG = load_config("star_tiny")


def _model(seed=0):
  return STAR(CONFIG["model"], patch_dim=PATCH * PATCH * 3, num_classes=NUM_CLASSES, max_videos=MAX_VIDEOS,
              max_grid=SIZE // PATCH, num_frames=FRAMES, max_actors=MAX_ACTORS, rngs=nnx.Rngs(seed))


def _outputs(model, batch):
  return model(batch["patches"], batch["patch_yx"], batch["patch_t"], batch["segment_ids"])


_forward = nnx.jit(_outputs)


@nnx.jit
def _train_step(model, optimizer, batch):
  """-> (loss, gradients); the optimizer updates the model. One compiled step for the gradient and overfit tests."""
  loss, grads = nnx.value_and_grad(lambda model: star_loss(_outputs(model, batch), batch, CONFIG["loss"])[0])(model)
  optimizer.update(model, grads)
  return loss, grads


# One transformation object for every optimizer: it is static in the jitted step, so a new one would recompile.
_ADAMW = optax.adamw(CONFIG["train"]["learning_rate"], weight_decay=1e-4)


def _optimizer(model):
  return nnx.Optimizer(model, _ADAMW, wrt=nnx.Param)


@pytest.mark.slow
def test_outputs_have_the_documented_shapes(clips):
  outputs = _forward(_model(), clips)
  queries = CONFIG["model"]["num_queries"]
  assert outputs["boxes"].shape == (1, MAX_VIDEOS, queries, FRAMES, 4)
  assert outputs["logits"].shape == (1, MAX_VIDEOS, queries, FRAMES, NUM_CLASSES + 1)
  np.testing.assert_array_equal(outputs["slots"], [[True, True, False]])
  # The action logits are shared by the frames of a tubelet; "no action" is per frame.
  actions = np.asarray(outputs["logits"][..., :NUM_CLASSES])
  np.testing.assert_allclose(actions, np.broadcast_to(actions[..., :1, :], actions.shape), rtol=1e-6)
  boxes = np.asarray(outputs["boxes"])
  assert (boxes[..., 2:] >= boxes[..., :2]).all()


@pytest.mark.slow
def test_gradients_flow_through_the_jitted_loss(clips):
  model = _model()
  loss, grads = _train_step(model, _optimizer(model), clips)
  grads = nnx.to_pure_dict(grads)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  for name in ("embed", "pos_time", "blocks", "spatial_queries", "temporal_queries", "decoder", "box_out",
               "class_head"):
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[name])) > 0, name


def test_packed_clips_never_see_each_other(clips):
  model = _model()
  before = _forward(model, clips)
  changed = dict(clips, patches=np.where((clips["segment_ids"] == 1)[..., None], 255 - clips["patches"],
                                         clips["patches"]))
  after = _forward(model, changed)
  for key in ("boxes", "logits"):
    assert not np.allclose(before[key][0, 0], after[key][0, 0]), key  # clip 1 itself changed
    np.testing.assert_allclose(before[key][0, 1], after[key][0, 1], rtol=1e-5, atol=1e-6)  # clip 2 did not


@pytest.mark.slow
def test_two_clips_overfit_and_their_actions_are_recovered(clips):
  model = _model()
  optimizer = _optimizer(model)
  losses = [float(_train_step(model, optimizer, clips)[0]) for _ in range(150)]
  assert np.isfinite(losses).all()
  assert np.mean(losses[-10:]) < 0.1 * losses[0], (losses[0], losses[-10:])
  detections = predict_tubelets(_forward(model, clips), score_threshold=0.5)[0]
  assert detections[2] == []  # the empty slot
  for slot in range(2):
    true_labels = sorted(int(label) for label in clips["tube_labels"][0, slot] if label >= 0)
    assert sorted(d["label"] for d in detections[slot]) == true_labels, (slot, detections[slot])

