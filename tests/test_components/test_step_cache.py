import shutil

from components import step_cache


def test_cache_key_changes_with_code_params_and_input_content(tmp_path):
  root = tmp_path / "src"
  shutil.copytree(step_cache._SOURCE_ROOT + "/trainers", root / "trainers", ignore=shutil.ignore_patterns("__pycache__"))
  data = tmp_path / "data"
  data.mkdir()
  (data / "a.txt").write_text("one")
  key = lambda params=None: step_cache.cache_key("train", ("trainers",), params or {"steps": 1}, {"d": str(data)},
                                            root=str(root))
  first = key()
  assert key() == first
  assert key({"steps": 2}) != first
  (data / "a.txt").write_text("two")
  second = key()
  assert second != first
  with open(root / "trainers" / "model.py", "a") as f:
    f.write("\n# a code change\n")
  assert key() != second


def test_run_cached_hit_restores_outputs_without_running(tmp_path, monkeypatch):
  monkeypatch.setenv("PATCHFLOW_CACHE", str(tmp_path / "cache"))
  calls = []

  def work(out):
    def fn():
      calls.append(out)
      (tmp_path / out).mkdir()
      (tmp_path / out / "f.txt").write_text("payload")
      return {"value": 3}
    return fn
  first = step_cache.run_cached("step", ("schemas",), {"p": 1}, {}, {"o": str(tmp_path / "out1")}, work("out1"))
  second = step_cache.run_cached("step", ("schemas",), {"p": 1}, {}, {"o": str(tmp_path / "out2")}, work("out2"))
  assert first == second == {"value": 3} and calls == ["out1"]
  assert (tmp_path / "out2" / "f.txt").read_text() == "payload"
  step_cache.run_cached("step", ("schemas",), {"p": 2}, {}, {"o": str(tmp_path / "out3")}, work("out3"))
  assert calls == ["out1", "out3"]
