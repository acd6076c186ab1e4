"""Sparse top-k: PAV vs Dykstra vs jax.lax.top_k, forward and forward+backward, measured side by side.

  .venv/bin/python benchmarks/sparse_topk.py [--repeats 5] [--p 2 1.3333333]

Cases: router-shaped logits (8192 tokens x 64 experts, k = 2) and one long vector (n = 10^5, k = 100), float32
standard normal, l = 0.1. Every function is jit-compiled and warmed up; times are the median of --repeats
runs. "fwd+bwd" is jax.grad of sum(out * r) for a fixed random r (for lax.top_k: of its k values). The ratio
columns divide by lax.top_k's time for the same case. "full sort" is lax.top_k(x, n), the sort every
relaxed solver starts with. "max |y - y_pav|" is each solver's largest deviation from PAV (exact).
Expect about 1-2 minutes on 2 CPU cores.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from trainers.ops import sparse_topk_mask  # noqa: E402

CASES = [("router 8192x64, k=2", (8192, 64), 2), ("long n=1e5, k=100", (100_000,), 100)]
L = 0.1


def median_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))            # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def methods(k, ps):
  """name -> (forward fn, scalar objective for fwd+bwd)."""
  out = {
      "lax.top_k (hard)": (lambda x: jax.lax.top_k(x, k),
                           lambda x, r: jnp.sum(jax.lax.top_k(x, k)[0] * r[..., :k])),
      "full sort (lax.top_k(x, n))": (lambda x: jax.lax.top_k(x, x.shape[-1]), None),
  }
  for p in ps:
    for solver in ("pav", "dykstra"):
      f = lambda x, solver=solver, p=p: sparse_topk_mask(x, k, l=L, p=p, solver=solver)
      out[f"{solver} p={p:.3g}"] = (f, lambda x, r, f=f: jnp.sum(f(x) * r))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--p", type=float, nargs="+", default=[2.0, 4.0 / 3.0])
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores visible), "
        f"float32, l={L}, median of {args.repeats}")
  header = (f"{'case':<22} {'method':<28} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd/top_k':>10} "
            f"{'f+b/top_k':>10} {'max|y-y_pav|':>13}")
  print(header)
  print("-" * len(header))
  for case, shape, k in CASES:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    r = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    base_fwd = base_bwd = None
    reference = {}
    for name, (fwd, objective) in methods(k, args.p).items():
      fwd_jit = jax.jit(fwd)
      t_fwd = median_seconds(fwd_jit, (x,), args.repeats)
      t_bwd = median_seconds(jax.jit(jax.grad(objective)), (x, r), args.repeats) if objective else float("nan")
      if base_fwd is None:
        base_fwd, base_bwd = t_fwd, t_bwd
      deviation = ""
      if " p=" in name:
        solver, p = name.split(" ")
        y = np.asarray(fwd_jit(x))
        if solver == "pav":
          reference[p] = y
        deviation = f"{np.abs(y - reference[p]).max():.1e}"
      print(f"{case:<22} {name:<28} {t_fwd * 1e3:>9.2f} {t_bwd * 1e3:>11.2f} {t_fwd / base_fwd:>10.1f} "
            f"{t_bwd / base_bwd:>10.1f} {deviation:>13}")
    print()


if __name__ == "__main__":
  main()
