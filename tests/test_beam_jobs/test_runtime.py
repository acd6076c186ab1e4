from beam_jobs.runtime import gc_paused


def test_gc_pause_overlapping_in_threads_restores_the_collector_once_the_last_leaves():
  """A enters, B enters, A leaves, B leaves. A plain save-disable-restore per call turns the collector back on
  while B is still inside here (and, in a tighter race, left it off for good: B saved "off" while A paused it)."""
  import gc
  import threading
  a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
  seen = {}

  def a():
    with gc_paused():
      a_in.set()
      b_in.wait(5)
    a_out.set()

  def b():
    a_in.wait(5)
    with gc_paused():
      b_in.set()
      a_out.wait(5)
      seen["inside_b_after_a_left"] = gc.isenabled()

  assert gc.isenabled()
  threads = [threading.Thread(target=a), threading.Thread(target=b)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(10)
  assert seen == {"inside_b_after_a_left": False} and gc.isenabled()
  gc.disable()  # a caller's own choice survives a pause
  try:
    with gc_paused():
      pass
    assert not gc.isenabled()
  finally:
    gc.enable()
