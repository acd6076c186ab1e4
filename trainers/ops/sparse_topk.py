"""Sparse, differentiable top-k (Sander et al., ICML 2023) in pure JAX: PAV and Dykstra solvers.

The maths, derived here from the paper's definitions because every function below relies on it:

- Hard top-k mask: argmax over y in P(w) of <x, y>, where w = (1,...,1,0,...,0) holds k ones and P(w), the
  permutahedron (convex hull of the permutations of w), is the capped simplex {y in [0,1]^n : sum(y) = k}.
- Regularised mask: y*(x) = argmax_{y in P(w)} <x, y> - l * sum_i |y_i|^p / p. Dividing by l, it is the same
  problem for z = x / l with phi(y) = |y|^p / p; for p = 2 it is the Euclidean projection of z onto P(w).
- Fenchel duality (the support function of P(w) is u -> <w, sort_desc(u)>) gives y* = grad Phi*(z - u*) where
  u* is ordered like z. In sorted coordinates s = sort_desc(z), v = u* sorted solves the isotonic problem
      min over v_1 >= v_2 >= ... >= v_n of  sum_i phi*(s_i - v_i) + w_i * v_i,
  with phi*(u) = |u|^q / q, q = p / (p - 1), hence y_i = g(s_i - v_i), g(u) = sign(u) |u|^(1 / (p - 1)).
- v is constant on blocks of consecutive sorted positions; a block's value gamma solves
  sum_{i in B} g(s_i - gamma) = sum_{i in B} w_i. p = 2: gamma = mean(s - w). p = 4/3: g(u) = u^3, so gamma
  is the one real root of a cubic whose coefficients are the block's count, mean and 2nd/3rd central moments
  (mergeable, so PAV merges are O(1)); Cardano gives it in closed form. Any other p: bisection, the merged
  value lying between the values of the two blocks merged.
- A block of one element has y_i = w_i exactly: these are the exact zeros (and exact ones) of the mask.
- Since w takes two values, the isotonic solution pools a single block around position k and the mask is
  y = clip(g(z - tau), 0, 1) with sum(y) = k. Its Jacobian is diag(d) - d d^T / sum(d) with d_i = g'(z_i - tau)
  on the pooled block (1 for p = 2): block-wise centring, what the PAV derivative below computes per block.
- Top-k in magnitude: grad_x of max_{y in P(w)} <y, x^2 / 2> - l * Omega(y), i.e. x * mask(x^2 / 2). It keeps
  signs, selects by |x|, and as l -> 0 becomes x on the k largest |x_i| and 0 elsewhere.

Solvers. "pav": pool-adjacent-violators with a block stack in one lax.while_loop (each element is pushed once
and each merge pops once, so at most 2n steps); derivatives exact, from the PAV blocks. On CPU the rows of a
batch run one after another (lax.map), 4-5x faster there than a vmapped loop; elsewhere they are vmapped.
"dykstra": alternating projections onto the constraints v_i >= v_{i+1} for even i, then odd i (independent
two-element problems, so every step is elementwise: the accelerator-friendly solver), with Dykstra's
corrections, until a sweep moves nothing by more than a tolerance (or hits a sweep cap); generalised to
p != 2 as block-coordinate ascent on the dual. It is approximate: its error depends on the tolerance and on
the size of the pooled block (slow for long vectors with wide blocks), and its derivative is the exact
Jacobian formula evaluated at its approximate output.

Nothing here leaves JAX: no host callbacks, no numpy on traced values (numpy only builds static masks), so
everything works under jit, vmap, grad (forward and reverse mode) and on a sharded mesh.
"""

import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SOLVERS = ("pav", "dykstra")
DEFAULT_DYKSTRA_ITERS = 2000
DEFAULT_DYKSTRA_TOL = 1e-6
_BISECTION_STEPS = 60


# ---------------------------------------------------------------- the regulariser's link functions


def _kind(p: float) -> str:
  if p == 2.0:
    return "l2"
  if abs(p - 4.0 / 3.0) < 1e-9:
    return "cubic"
  return "bisect"


def _abs_pow(a, e):
  """a^e for a >= 0 through exp/log, which XLA vectorises on CPU; its pow and cbrt ran at ~20 ns per element
  there and dominated Dykstra sweeps for p != 2. Rounding is a few ulps (PAV merges polish by Newton)."""
  return jnp.where(a > 0, jnp.exp(e * jnp.log(jnp.where(a > 0, a, 1.0))), 0.0)


def _g(u, p):
  """(phi*)': the primal value of a coordinate whose dual residual is u."""
  if p == 2.0:
    return u
  if _kind(p) == "cubic":
    return u * u * u
  return jnp.sign(u) * _abs_pow(jnp.abs(u), 1.0 / (p - 1.0))


def _g_prime(u, p):
  """Derivative of g. For p > 2 it is infinite at 0; clamping keeps a pooled element that sits exactly on
  the edge of the support finite instead of NaN (the true one-sided slope there is infinite)."""
  if p == 2.0:
    return jnp.ones_like(u)
  e = 1.0 / (p - 1.0)
  a = jnp.abs(u)
  if e < 1.0:
    a = jnp.maximum(a, jnp.finfo(u.dtype).tiny ** 0.25)
  return e * _abs_pow(a, e - 1.0)


def _phi_prime(y, p):
  """phi' = g^{-1}: the dual residual that yields primal value y."""
  if p == 2.0:
    return y
  return jnp.sign(y) * _abs_pow(jnp.abs(y), p - 1.0)


def _cbrt(v):
  return jnp.sign(v) * _abs_pow(jnp.abs(v), 1.0 / 3.0)


def _depressed_cubic_root(P, Q):
  """The real root of u^3 + P u + Q = 0 for P >= 0 (one real root): Cardano in its cancellation-free form,
  on rescaled coefficients so that P^3 cannot overflow, then one Newton step to polish float rounding."""
  P = jnp.maximum(P, 0.0)
  h = jnp.maximum(jnp.sqrt(P / 3.0), _cbrt(jnp.abs(Q) / 2.0))
  safe_h = jnp.where(h > 0, h, 1.0)
  Pn, Qn = P / safe_h ** 2, Q / safe_h ** 3
  D = jnp.sqrt(Qn * Qn / 4.0 + Pn ** 3 / 27.0)
  T = -jnp.where(Qn >= 0, 1.0, -1.0) * _cbrt(jnp.abs(Qn) / 2.0 + D)
  u = T - Pn / (3.0 * jnp.where(T != 0, T, 1.0))
  u = u - (u ** 3 + Pn * u + Qn) / (3.0 * u * u + Pn + (3.0 * u * u + Pn == 0))
  return jnp.where(h > 0, u * h, 0.0)


def _bisect(f, lo, hi, steps=_BISECTION_STEPS):
  """Root of a decreasing f bracketed by lo <= root <= hi (elementwise)."""
  def step(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    positive = f(mid) > 0
    return jnp.where(positive, mid, lo), jnp.where(positive, hi, mid)
  lo, hi = lax.fori_loop(0, steps, step, (lo, hi))
  return 0.5 * (lo + hi)


# ---------------------------------------------------------------- PAV


def _pav_row(s, w, p):
  """Isotonic problem for one sorted row. Returns (y, v, block_size, block_index), each [n], sorted order.

  The stack holds one row per block: [start, count, W = sum w, gamma, extra statistics]; extra is sum(s)
  for p = 2, (mean, M2, M3) for p = 4/3 and nothing for bisection (which reads s over the block's range).
  """
  n = s.shape[0]
  kind = _kind(p)
  dt = s.dtype
  width = {"l2": 5, "cubic": 7, "bisect": 4}[kind]

  def singleton(i):
    si, wi = s[i], w[i]
    gamma = si - _phi_prime(wi, p)
    extra = {"l2": [si], "cubic": [si, jnp.zeros((), dt), jnp.zeros((), dt)], "bisect": []}[kind]
    return jnp.stack([i.astype(dt), jnp.ones((), dt), wi, gamma] + extra)

  def merged(a, b, end):
    count, W = a[1] + b[1], a[2] + b[2]
    if kind == "l2":
      total = a[4] + b[4]
      return jnp.stack([a[0], count, W, (total - W) / count, total])
    if kind == "cubic":
      # Chan et al.'s pairwise update of central moments: stable, unlike raw power sums.
      na, nb, delta = a[1], b[1], b[4] - a[4]
      mean = a[4] + delta * nb / count
      m2 = a[5] + b[5] + delta ** 2 * na * nb / count
      m3 = (a[6] + b[6] + delta ** 3 * na * nb * (na - nb) / count ** 2
            + 3.0 * delta * (na * b[5] - nb * a[5]) / count)
      u = _depressed_cubic_root(3.0 * m2 / count, (m3 - W) / count)
      return jnp.stack([a[0], count, W, mean - u, mean, m2, m3])
    idx = jnp.arange(n)
    inside = (idx >= a[0].astype(jnp.int32)) & (idx < end)
    f = lambda t: jnp.sum(jnp.where(inside, _g(s - t, p), 0.0)) - W
    return jnp.stack([a[0], count, W, _bisect(f, a[3], b[3])])

  def violation(top, stack):
    pair = lax.dynamic_slice_in_dim(stack, jnp.maximum(top - 1, 0), 2, 0)
    return (top >= 1) & (pair[0, 3] < pair[1, 3])

  # The violation flag for the next step is computed right after the write and carried, so neither the
  # loop condition nor the start of a step reads it from the stack. Reading it there made XLA copy the whole
  # stack every step (O(n^2) in all: 20 s instead of ~5 ms for n = 10^5 on CPU).
  def body(carry):
    i, top, stack, viol = carry
    pair = lax.dynamic_slice_in_dim(stack, jnp.maximum(top - 1, 0), 2, 0)
    i_safe = jnp.minimum(i, n - 1)
    if kind == "bisect":  # only pay for a bisection when there is something to merge
      row = lax.cond(viol, lambda: merged(pair[0], pair[1], i), lambda: singleton(i_safe))
    else:
      row = jnp.where(viol, merged(pair[0], pair[1], i), singleton(i_safe))
    top = jnp.where(viol, top - 1, top + 1)
    stack = lax.dynamic_update_index_in_dim(stack, row, top, 0)
    return i + jnp.where(viol, 0, 1), top, stack, violation(top, stack)

  stack = jnp.zeros((n + 1, width), dt).at[:, 1].set(1.0)   # one spare row: the pair read needs two
  init = (jnp.int32(0), jnp.int32(-1), stack, jnp.array(False))
  _, top, stack, _ = lax.while_loop(lambda c: (c[0] < n) | c[3], body, init)
  stack = stack[:n]
  starts = jnp.where(jnp.arange(n) <= top, stack[:, 0].astype(jnp.int32), n)
  block = jnp.cumsum(jnp.zeros(n, jnp.int32).at[starts].add(1, mode="drop")) - 1
  v, size = stack[block, 3], stack[block, 1]
  y = jnp.where(size > 1, _g(s - v, p), w)
  return jnp.clip(y, w[-1], w[0]), v, size, block


def _rows_in_sequence() -> bool:
  """CPU runs PAV row after row: XLA turns a vmapped stack update into a scatter that copies, 4-5x slower."""
  return jax.default_backend() == "cpu"


def _pav_rows(s, w, p):
  if _rows_in_sequence():
    return lax.map(lambda row: _pav_row(row[0], row[1], p), (s, w))
  return jax.vmap(lambda a, b: _pav_row(a, b, p))(s, w)


def _two_level_weights(s, k):
  return jnp.broadcast_to((jnp.arange(s.shape[-1]) < k).astype(s.dtype), s.shape)


@partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _pav_mask_sorted(s, k, p):
  """Mask in sorted coordinates for rows s [R, n] sorted in decreasing order."""
  return _pav_rows(s, _two_level_weights(s, k), p)[0]


@_pav_mask_sorted.defjvp
def _pav_mask_sorted_jvp(k, p, primals, tangents):
  (s,), (ds,) = primals, tangents
  y, v, size, block = _pav_rows(s, _two_level_weights(s, k), p)
  # Within a pooled block y_i = g(s_i - gamma) with sum_B g(s_i - gamma) fixed, so
  # dgamma = sum_B d ds / sum_B d and dy_i = d_i (ds_i - dgamma), d = g'(s - gamma): block-wise (weighted)
  # averaging over the PAV blocks. Blocks of one element have y = w: no derivative. Segment sums are
  # linear in the tangent, so reverse mode is their transpose.
  block = block + s.shape[-1] * jnp.arange(s.shape[0])[:, None]
  d = jnp.where(size > 1, _g_prime(s - v, p), 0.0)
  seg = lambda a: jax.ops.segment_sum(a.reshape(-1), block.reshape(-1), num_segments=s.size).reshape(-1)
  num, den = seg(d * ds), seg(d)
  dgamma = (num / jnp.where(den > 0, den, 1.0))[block]
  return y, d * (ds - dgamma)


# ---------------------------------------------------------------- Dykstra


def _pool_pairs(sa, sb, wa, wb, p, allowed):
  """Two-element isotonic problems (v_a >= v_b) with weights (wa, wb): returns the primal (ya, yb).
  Pairs where `allowed` is False are left unpooled (y = w)."""
  va, vb = sa - _phi_prime(wa, p), sb - _phi_prime(wb, p)
  pooled = (va < vb) & allowed
  W = wa + wb
  kind = _kind(p)
  if kind == "l2":
    half = 0.5 * (sa - sb)
    ya, yb = 0.5 * W + half, 0.5 * W - half
  elif kind == "cubic":
    half = 0.5 * (sa - sb)
    u = _depressed_cubic_root(3.0 * half * half, -0.5 * W)
    ya, yb = (half + u) ** 3, (u - half) ** 3
  else:
    gamma = _bisect(lambda t: _g(sa - t, p) + _g(sb - t, p) - W, jnp.minimum(va, vb), jnp.maximum(va, vb))
    ya, yb = _g(sa - gamma, p), _g(sb - gamma, p)
  return jnp.where(pooled, ya, wa), jnp.where(pooled, yb, wb)


def _dykstra_rows(s, k, p, iters, tol):
  """Dykstra / dual block-coordinate ascent on the two chain-constraint sets.

  With z1, z2 the dual variables of the even constraints (v_{2j} >= v_{2j+1}) and the odd ones
  (v_{2j+1} >= v_{2j+2}), each half-step solves the isotonic problem restricted to one set with the other
  set's dual folded into the linear term (w -> w + z), independent two-element problems, then sets its own
  dual to y - (w + z). For p = 2 this is exactly Dykstra's projection algorithm.

  Rows are kept de-interleaved (even positions, odd positions), so both half-steps are elementwise on
  contiguous arrays; slicing interleaved pairs made XLA's CPU code several times slower for p != 2.

  Stops after `iters` sweeps or once a sweep moves no coordinate of any row by more than `tol`. The default
  tol sits above the float32 rounding floor of the pair solves (p = 4/3 jitters by ~4e-7 forever).
  """
  n = s.shape[-1]
  w = _two_level_weights(s, k)
  if n % 2:  # one padding element at the end, never pooled with its neighbour
    s, w = (jnp.concatenate([a, a[..., -1:]], axis=-1) for a in (s, w))
  m = s.shape[-1] // 2
  se, so, we, wo = s[..., 0::2], s[..., 1::2], w[..., 0::2], w[..., 1::2]
  se_next = jnp.concatenate([se[..., 1:], se[..., -1:]], axis=-1)   # odd pairs are (odd j, even j + 1)
  even_allowed = jnp.arange(m) < (m - 1 if n % 2 else m)
  odd_allowed = jnp.arange(m) < m - 1

  def sweep(carry):
    i, z2e, z2o, ye_old, yo_old, _ = carry
    te, to = we + z2e, wo + z2o
    ye, yo = _pool_pairs(se, so, te, to, p, even_allowed)
    te, to = we + (ye - te), wo + (yo - to)   # w + z1
    te_next = lax.optimization_barrier(jnp.concatenate([te[..., 1:], te[..., -1:]], axis=-1))
    yo, ye_next = lax.optimization_barrier(_pool_pairs(so, se_next, to, te_next, p, odd_allowed))
    ye = jnp.concatenate([te[..., :1], ye_next[..., :-1]], axis=-1)
    delta = jnp.maximum(jnp.max(jnp.abs(ye - ye_old), initial=0.0), jnp.max(jnp.abs(yo - yo_old), initial=0.0))
    return i + 1, ye - te, yo - to, ye, yo, delta

  def running(carry):
    return (carry[0] < iters) & (carry[5] > tol)

  init = (jnp.int32(0), jnp.zeros_like(we), jnp.zeros_like(wo), we, wo, jnp.array(jnp.inf, s.dtype))
  carry = lax.while_loop(running, sweep, init)
  y = jnp.stack([carry[3], carry[4]], axis=-1).reshape(s.shape)[..., :n]
  return jnp.clip(y, 0.0, 1.0)


@partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _dykstra_mask_sorted(s, k, p, iters, tol):
  return _dykstra_rows(s, k, p, iters, tol)


@_dykstra_mask_sorted.defjvp
def _dykstra_mask_sorted_jvp(k, p, iters, tol, primals, tangents):
  (s,), (ds,) = primals, tangents
  y = _dykstra_rows(s, k, p, iters, tol)
  # The exact Jacobian of y = clip(g(s - tau), 0, 1), sum(y) = k, evaluated at Dykstra's y:
  # d_i = g'(g^{-1}(y_i)) = y_i^(2 - p) / (p - 1) on 0 < y_i < 1.
  inside = (y > 0) & (y < 1)
  safe = jnp.where(inside, y, 0.5)
  d = jnp.where(inside, safe ** (2.0 - p) / (p - 1.0), 0.0)
  den = d.sum(-1, keepdims=True)
  dtau = (d * ds).sum(-1, keepdims=True) / jnp.where(den > 0, den, 1.0)
  return y, d * (ds - dtau)


# ---------------------------------------------------------------- public operators


def _check(k, l, p, solver, n):
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
    raise ValueError(f"k must be an int in [1, {n}] (the size of the last axis), got {k!r}")
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p > 1.0):
    raise ValueError(f"p must be a finite number > 1, got {p!r}")
  if isinstance(l, (int, float)) and not l > 0:
    raise ValueError(f"l must be > 0, got {l!r}")
  if n > 2 ** 24:  # PAV keeps block starts in the float stack, exact up to 2^24 in float32
    raise ValueError(f"x's last axis has {n} entries; at most 2^24 are supported")


def sparse_topk_mask(x, k: int, *, l=0.1, p: float = 2.0, solver: str = "pav",
                     dykstra_iters: int = DEFAULT_DYKSTRA_ITERS, dykstra_tol: float = DEFAULT_DYKSTRA_TOL):
  """Relaxed top-k mask over the last axis of x (any batch shape): argmax over the capped simplex
  {y in [0,1]^n : sum(y) = k} of <x, y> - l * sum |y_i|^p / p.

  The result sums to k, lies in [0, 1], is sparse (exact zeros below the threshold), equals the hard top-k
  indicator when the k-th and (k+1)-th values are at least ~l apart, and tends to it as l -> 0. For p = 2 it
  is the Euclidean projection of x / l onto the capped simplex. Differentiable in x (and in l); ties get
  equal mask values. "dykstra" stops after `dykstra_iters` sweeps or when a sweep changes nothing by more
  than `dykstra_tol`.
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError("x must have at least one axis (top-k is taken over the last one)")
  _check(k, l, p, solver, x.shape[-1])
  return _mask(x, l, k=int(k), p=float(p), solver=solver, iters=int(dykstra_iters), tol=float(dykstra_tol))


@partial(jax.jit, static_argnames=("k", "p", "solver", "iters", "tol"))
def _mask(x, l, *, k, p, solver, iters, tol):
  n = x.shape[-1]
  compute = jnp.promote_types(x.dtype, jnp.float32)
  z = (x.astype(compute) / l).reshape(-1, n)
  # lax.top_k(., n) is a full descending sort that also returns the permutation, faster than argsort on CPU.
  _, order = lax.top_k(lax.stop_gradient(z), n)
  s = jnp.take_along_axis(z, order, axis=-1)
  if solver == "pav":
    y_sorted = _pav_mask_sorted(s, k, p)
  else:
    y_sorted = _dykstra_mask_sorted(s, k, p, iters, tol)
  rows = jnp.arange(z.shape[0])[:, None]
  y = jnp.zeros_like(z).at[rows, order].set(y_sorted)
  # Blocks of one element copy w, so a NaN would otherwise come out as a confident 0/1 mask.
  y = jnp.where(jnp.isnan(z).any(axis=-1, keepdims=True), jnp.nan, y)
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else compute
  return y.reshape(x.shape).astype(out_dtype)


def sparse_topk_magnitude(x, k: int, *, l=0.1, p: float = 2.0, solver: str = "pav",
                          dykstra_iters: int = DEFAULT_DYKSTRA_ITERS,
                          dykstra_tol: float = DEFAULT_DYKSTRA_TOL):
  """Relaxed top-k in magnitude over the last axis: x * sparse_topk_mask(x^2 / 2, k), the gradient of the
  regularised max over the capped simplex of <y, x^2 / 2>. Keeps signs, zeroes all but (about) the k
  largest |x_i|, and tends to the hard top-k-in-magnitude as l -> 0 (l is in units of x^2 / 2)."""
  x = jnp.asarray(x)
  mask = sparse_topk_mask(0.5 * jnp.square(x), k, l=l, p=p, solver=solver, dykstra_iters=dykstra_iters,
                          dykstra_tol=dykstra_tol)
  return x * mask
