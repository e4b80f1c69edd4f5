"""A float64 numpy model of NeuroDiff's forward pass and input-splitting search, for measurement only.

NeuroDiff (Paulsen, Wang, Wang, Wang, ASE 2020; artifact ``pauls658/NeuroDiff-ASE2020-Artifact``,
``DiffNN-Code/nnet.c`` and ``split.c``) as read there, rewritten from the description (no code
copied), for ``.nnet`` chains in normalised input coordinates:

* symbolic intervals of ``z``, ``z'`` and ``Delta = z' - z`` in the inputs; the affine step of
  ``Delta`` is ``(W' - W) z + W' Delta`` (interval products by the weights' signs);
* ``relu`` relaxed per bounding function over its own range (``mode="neurify"``, the artifact's
  LINEQ), or over the neuron's range with CROWN's lower slope (``mode="node"``, qbound's default);
* ``Delta``'s nine cases with per-function chords where both neurons change sign (LINEQDELTA);
  no intermediate symbolic variables (EXTRAVARS) and no intersection with ``z' - z``;
* depth-first bisection of the input with the largest ``max|grad| * width`` of an interval gradient
  of ``f - f'`` (from the neuron states of the pass), faces first where ``Delta`` is monotone
  (``split="grad"``), or of the largest ``(|L| + |U|) * width`` of the output's functions
  (``use_mono="coef"``, qbound's forward loop's rule).

Not sound against float rounding (float64, no margins): it counts splits, it proves nothing.

Run: ``python benchmarks/neurodiff_reference.py neurify:nomono,neurify:coef 1,2,7`` (variants
``mode:split`` with split ``mono``, ``nomono`` or ``coef``; nets 1_k vs float16, property 1,
epsilon 0.05, output 0; at most 20,000 pieces each).
"""
import pathlib
import time

import numpy as np

def affine(W, b, L, l, U, u):
  # W: (in, out) kernel; eq coefficient arrays L: (n, in)
  Wp, Wn = np.maximum(W, 0), np.minimum(W, 0)
  nL = L @ Wp + U @ Wn; nl = l @ Wp + u @ Wn + b
  nU = U @ Wp + L @ Wn; nu = u @ Wp + l @ Wn + b
  return nL, nl, nU, nu

def conc(L, l, U, u, c, r):
  low = c @ L - r @ np.abs(L) + l
  lowsUp = c @ L + r @ np.abs(L) + l
  upsLow = c @ U - r @ np.abs(U) + u
  up = c @ U + r @ np.abs(U) + u
  return low, lowsUp, upsLow, up

def relu_eq(L, l, U, u, low, lowsUp, upsLow, up, mode):
  """Unstable neurons' relaxation; mode 'neurify' (own ranges) or 'node' (chord over [low, up], CROWN lower)."""
  unst = (low < 0) & (up > 0)
  act = low >= 0
  if mode == "neurify":
    s_up = np.where(unst & (upsLow < 0), up / np.where(unst & (upsLow < 0), up - upsLow, 1), 1.0)
    o_up = np.where(unst & (upsLow < 0), -s_up * upsLow, 0.0)
    s_lo = np.where(unst, np.where(lowsUp <= 0, 0.0, lowsUp / np.where(lowsUp - low > 0, lowsUp - low, 1)), 1.0)
  else:
    s_up = np.where(unst, up / np.where(unst, up - low, 1), 1.0)
    o_up = np.where(unst, -s_up * low, 0.0)
    s_lo = np.where(unst, (up >= -low).astype(float), 1.0)
  keep = act | unst
  s_up = np.where(keep, s_up, 0.0); o_up = np.where(keep, o_up, 0.0); s_lo = np.where(keep, s_lo, 0.0)
  return L * s_lo, l * s_lo, U * s_up, u * s_up + o_up

def neurodiff_forward(layers, layers_q, lo, hi, mode="neurify"):
  """layers: list of (W (in,out), b); returns (dlow, dup) of d = f - fq at the output (per output)."""
  n = lo.size
  c, r = (lo + hi) / 2, (hi - lo) / 2
  I = np.eye(n); z = (I, np.zeros(n), I, np.zeros(n)); q = z
  D = (np.zeros((n, n)), np.zeros(n), np.zeros((n, n)), np.zeros(n))  # Delta = zq - z
  states = []
  for k, ((W, b), (Wq, bq)) in enumerate(zip(layers, layers_q)):
    Wd, bd = Wq - W, bq - b
    nz = affine(W, b, *z); nq = affine(Wq, bq, *q)
    a = affine(Wd, bd, *z); bb = affine(Wq, 0 * bq, *D)
    nD = tuple(x + y for x, y in zip(a, bb))
    cz = conc(*nz, c, r); cq = conc(*nq, c, r); cd = conc(*nD, c, r)
    if k == len(layers) - 1:
      return -cd[3], -cd[0], (states, nD)
    low, lowsUp, upsLow, up = cz
    plow, plowsUp, pupsLow, pup = cq
    dlow, dlowsUp, dupsLow, dup = cd
    st = lambda lo_, up_: np.where(up_ <= 0, 0, np.where(lo_ >= 0, 2, 1))
    states.append((st(cz[0], cz[3]), st(cq[0], cq[3])))
    rz = relu_eq(*nz, *cz, mode); rq = relu_eq(*nq, *cq, mode)
    zin, zact, zun = up <= 0, low >= 0, (low < 0) & (up > 0)
    qin, qact, qun = pup <= 0, plow >= 0, (plow < 0) & (pup > 0)
    DL, Dl, DU, Du = [x.copy() for x in nD]
    def setlo(m, Lc, lc):
      DL[:, m] = Lc[:, m] if np.ndim(Lc) else 0; Dl[m] = lc[m] if np.ndim(lc) else lc
    def setup(m, Uc, uc):
      DU[:, m] = Uc[:, m] if np.ndim(Uc) else 0; Du[m] = uc[m] if np.ndim(uc) else uc
    Z = np.zeros_like(nD[0]); z0 = np.zeros_like(nD[1])
    m = zin & qin; setlo(m, Z, z0); setup(m, Z, z0)                       # 1
    m = zin & qact; setlo(m, nq[0], nq[1]); setup(m, nq[2], nq[3])         # 2
    m = zin & qun; setlo(m, Z, z0); setup(m, rq[2], rq[3])                 # 3
    m = zact & qin; setlo(m, -nz[2], -nz[3]); setup(m, -nz[0], -nz[1])     # 4
    # 5: both active, unchanged
    m = zact & qun; setup(m, Z, np.maximum(-low, dup))                     # 6
    m = zun & qin; setlo(m, -rz[2], -rz[3]); setup(m, Z, z0)               # 7
    m = zun & qact; setlo(m, Z, np.minimum(plow, dlow))                    # 8
    m = zun & qun                                                          # 9
    mu = m & (dup < 0); setup(mu, Z, z0)
    mu = m & (dup >= 0) & (dupsLow < 0)
    s = np.where(mu, dup / np.where(mu, dup - dupsLow, 1), 1.0)
    DU[:, mu] = (nD[2] * s)[:, mu]; Du[mu] = (nD[3] * s - s * dupsLow)[mu]
    ml = m & (dlow > 0); setlo(ml, Z, z0)
    ml = m & (dlow <= 0) & (dlowsUp > 0)
    s = np.where(ml, -dlow / np.where(ml, dlowsUp - dlow, 1), 1.0)
    DL[:, ml] = (nD[0] * s)[:, ml]; Dl[ml] = (nD[1] * s - dlowsUp * s)[ml]
    z, q, D = rz, rq, (DL, Dl, DU, Du)


def interval_grad(layers, states, target, which):
  W = layers[-1][0][:, target]
  gl, gu = W.copy(), W.copy()
  for layer in range(len(layers) - 2, -1, -1):
    R = states[layer][which]
    gl = np.where(R == 0, 0, np.where(R == 1, np.minimum(gl, 0), gl))
    gu = np.where(R == 0, 0, np.where(R == 1, np.maximum(gu, 0), gu))
    Wl = layers[layer][0]  # (in, out)
    Wp, Wn = np.maximum(Wl, 0), np.minimum(Wl, 0)
    gl, gu = Wp @ gl + Wn @ gu, Wp @ gu + Wn @ gl
  return gl, gu

def smear_split(lo, hi, gl, gu, use_mono=True):
  width = hi - lo
  feats = width > 0
  mono = feats & ((gu <= 0) | (gl >= 0))
  if use_mono and mono.any():
    sm = np.where(mono, np.maximum(gu, -gl) * width, -np.inf)
    return int(np.argmax(sm)), True, int(feats.sum())
  sm = np.where(feats, np.maximum(np.abs(gu), np.abs(gl)) * width, -np.inf)
  return int(np.argmax(sm)), False, int(feats.sum())

def bab(lf, lq, lo, hi, eps, target=0, mode="neurify", use_mono=True, split="grad", max_passes=200000):
  if use_mono == "coef":
    split, use_mono = "coef", False
  stack = [(lo, hi)]
  splits = passes = 0
  while stack:
    lo, hi = stack.pop()
    passes += 1
    if passes > max_passes:
      return splits, passes, "budget"
    dl, du, (states, outD) = neurodiff_forward(lf, lq, lo, hi, mode)
    if -eps < dl[target] and du[target] < eps:
      continue
    splits += 1
    if split == "grad":
      g1 = interval_grad(lf, states, target, 0)
      g2 = interval_grad(lq, states, target, 1)
      gl, gu = g1[0] - g2[1], g1[1] - g2[0]
      j, mono, nf = smear_split(lo, hi, gl, gu, use_mono)
    else:  # qbound forward_bab's: |L| + |U| of the output's linear bounds times the width
      sens = np.abs(outD[0][:, target]) + np.abs(outD[2][:, target])
      j, mono = int(np.argmax(np.where(hi > lo, sens * (hi - lo), -np.inf))), False
    if mono:
      a_lo, a_hi = lo.copy(), hi.copy(); a_lo[j] = a_hi[j] = hi[j]
      b_lo, b_hi = lo.copy(), hi.copy(); b_lo[j] = b_hi[j] = lo[j]
      if nf <= 1:
        continue  # ND checks the two points concretely and stops here
      stack += [(b_lo, b_hi), (a_lo, a_hi)]
    else:
      mid = (lo[j] + hi[j]) / 2
      a_lo, a_hi = lo.copy(), hi.copy(); a_lo[j] = mid
      b_lo, b_hi = lo.copy(), hi.copy(); b_hi[j] = mid
      stack += [(b_lo, b_hi), (a_lo, a_hi)]
  return splits, passes, "proved"


def main():
  import argparse

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("variants", help="comma-separated mode:split variants, e.g. neurify:nomono,neurify:coef")
  parser.add_argument("nets", help="comma-separated k of the ACAS Xu nets 1_k, e.g. 1,2,7")
  args = parser.parse_args()
  import qbound as qb
  B = pathlib.Path(__file__).resolve().parents[2] / "shared" / "bench"
  def layers_of(path):
    apply, p = qb.io.load_nnet(path)
    dense = [p["params"][f"dense_{i}"] for i in range(7)]
    return p, [(np.asarray(d["kernel"], np.float64), np.asarray(d["bias"], np.float64)) for d in dense]
  lo_raw = np.array([55947.691, -3.141592, -3.141592, 1145, 0])
  hi_raw = np.array([60760, 3.141592, 3.141592, 1200, 60])
  for k in [int(a) for a in args.nets.split(",")]:
    name = f"ACASXU_run2a_1_{k}_batch_2000"
    p, lf = layers_of(B / "nnet" / f"{name}.nnet"); _, lq = layers_of(B / "nnet_16bit" / f"{name}_16bit.nnet")
    m, r = np.asarray(p["normalisation"]["means"], np.float64), np.asarray(p["normalisation"]["ranges"], np.float64)
    lo, hi = (lo_raw - m) / r, (hi_raw - m) / r
    for variant in args.variants.split(","):
      mode, mono = variant.split(":")
      t = time.perf_counter()
      use_mono = (mono == "mono") if mono != "coef" else "coef"
      res = bab(lf, lq, lo, hi, 0.05, mode=mode, use_mono=use_mono, max_passes=20000)
      print(k, variant, "splits %d passes %d %s" % res, "%.1fs" % (time.perf_counter() - t), flush=True)


if __name__ == "__main__":
  main()
