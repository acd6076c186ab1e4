"""Video files for the shard builder, decoded with PyAV (FFmpeg's libraries, bundled in its wheels).

A manifest record whose `video` is a path (mp4, webm, avi, mkv, ... whatever FFmpeg demuxes) becomes the same
example as a list of frame images: `num_frames` frames sampled at fixed positions, in order. Sampling is by
frame index over the decoded frames of the first video stream, never by timestamps, and decoding runs on one
thread, so the frames depend only on the file and the pinned FFmpeg build, not on the machine.
"""

import io

import av
import numpy as np


def sample_indices(total: int, num_frames: int) -> list[int]:
  """`num_frames` frame indices spread evenly over `total` frames: the middle frame of each of `num_frames`
  equal segments (every frame when there are no more than `num_frames`)."""
  if total <= num_frames:
    return list(range(total))
  return [(2 * i + 1) * total // (2 * num_frames) for i in range(num_frames)]


def _frames(data: bytes):
  container = av.open(io.BytesIO(data), mode="r")
  try:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "NONE"  # one decoding thread: the same frames on every machine
    stream.thread_count = 1
    yield from container.decode(stream)
  finally:
    container.close()


def probe(data: bytes) -> tuple[int, int, int]:
  """(frames, height, width) of a video file's first video stream, by decoding every frame (so a file that is
  cut short or corrupt fails here, at planning, not when its shard is written). Raises on a file FFmpeg cannot
  read, one without a video stream and one with no decodable frame."""
  total, height, width = 0, 0, 0
  for frame in _frames(data):
    if total == 0:
      height, width = frame.height, frame.width
    total += 1
  if total == 0:
    raise ValueError("no decodable video frame")
  return total, height, width


def decode_sampled(data: bytes, total: int, num_frames: int) -> list[np.ndarray]:
  """The sampled frames of a video file (`total` frames, as `probe` counted them) as uint8 RGB [H, W, 3]."""
  wanted = sample_indices(total, num_frames)
  out, next_wanted = [], 0
  for index, frame in enumerate(_frames(data)):
    if next_wanted < len(wanted) and index == wanted[next_wanted]:
      # One scaler thread too: by default FFmpeg's scaler starts and joins threads for every frame converted.
      out.append(frame.to_ndarray(format="rgb24", threads=1))
      next_wanted += 1
      if next_wanted == len(wanted):
        break
  if len(out) != len(wanted):
    raise ValueError(f"decoded {len(out)} of the {len(wanted)} sampled frames (the file changed since planning?)")
  return out
