"""The ACAS Xu input boxes of properties 1-10, in raw units and normalised as the .nnet files say.

The properties are those of Katz, Barrett, Dill, Julian and Kochenderfer, "Reluplex: An Efficient
SMT Solver for Verifying Deep Neural Networks", CAV 2017, Appendix VI (arXiv:1702.01135), with the
numbers as VNN-COMP's ACAS Xu benchmark writes them (pi as 3.141592, e.g. psi in
[-3.141592, -3.141592 + 0.005]; Bak, Liu and Johnson, arXiv:2109.00498). The inputs are, in order,

  rho (ft, distance to the intruder), theta (rad, angle to the intruder), psi (rad, the intruder's
  heading relative to ownship's), v_own and v_int (ft/s, the two speeds).

Reluplex states properties 5-10 for one network each (5 and 6 on N_1,1, 7 on N_1,9, 8 on N_2,9,
9 on N_3,3, 10 on N_4,5) and each property has an output condition. Here, as in VeryDiff's
``acas-prune`` family (Teuber, Kern, Janzen and Beckert, "Revisiting Differential Verification:
Equivalence Verification with Confidence", TACAS 2025), only the input boxes are used: the claim
checked on every network pair is epsilon-equivalence, ``max_{x in box} max_j |f_j(x) - f_q,j(x)|
<= epsilon`` over all five outputs. Property 6 is a union of two boxes; it is kept as ``6.1`` and
``6.2`` (VNN-COMP's names) but is not in `DEFAULT` (properties 1-5 and 7-10).

Properties 1 and 2 share one box, so on a pair they are the same instance. Property 4 fixes psi
(lower == upper == 0): a box of dimension 4 in a 5-dimensional input, kept as such (branch and
bound never splits a dimension of width 0).

Boxes are returned as float32 :class:`qbound.Box` es rounded *outward* from the decimal numbers, so
a proof on the float32 box covers the box written in the paper.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np

import qbound as qb

PI = 3.141592  # as the Reluplex appendix and VNN-COMP write it (the files' own limit is 3.141593)

INPUT_NAMES = ("rho", "theta", "psi", "v_own", "v_int")


@dataclasses.dataclass(frozen=True)
class AcasProperty:
  """One ACAS Xu property's input box, in raw units.

  Attributes:
    name: '1' .. '10', or '6.1' / '6.2' for the two halves of property 6.
    lower: the box's lower corner (rho, theta, psi, v_own, v_int), raw units.
    upper: its upper corner.
    networks: the networks Reluplex states it for (here it is used on any pair).
    description: Reluplex's own one-line description of the property.
  """

  name: str
  lower: tuple[float, ...]
  upper: tuple[float, ...]
  networks: str
  description: str

  def raw_box(self) -> qb.Box:
    """The box in raw units, float32, rounded outward."""
    return _outward_box(np.asarray(self.lower, np.float64), np.asarray(self.upper, np.float64))

  def normalised_box(self, normalisation: Mapping) -> qb.Box:
    """The box as the network sees it: ``(clip(x, mins, maxes) - means) / ranges``.

    Args:
      normalisation: ``params['normalisation']`` of `qbound.io.load_nnet` (mins, maxes, means,
        ranges of the inputs).

    Returns:
      The normalised box, computed in float64 and rounded outward to float32. Clipping is
      monotone and the map is increasing (ranges are positive), so the corners map to corners.
    """
    return normalised_box(self.lower, self.upper, normalisation)


# Reluplex, CAV 2017, Appendix VI; numbers as in VNN-COMP's ACAS Xu benchmark generator.
PROPERTIES: dict[str, AcasProperty] = {p.name: p for p in [
    AcasProperty("1", (55947.691, -PI, -PI, 1145.0, 0.0), (60760.0, PI, PI, 1200.0, 60.0), "all 45",
                 "distant intruder, significantly slower than ownship: COC score at most 1500"),
    AcasProperty("2", (55947.691, -PI, -PI, 1145.0, 0.0), (60760.0, PI, PI, 1200.0, 60.0), "N_x,y, x >= 2",
                 "distant intruder, significantly slower than ownship: COC score never maximal"),
    AcasProperty("3", (1500.0, -0.06, 3.10, 980.0, 960.0), (1800.0, 0.06, PI, 1200.0, 1200.0),
                 "all but N_1,7-9", "intruder directly ahead, moving towards ownship: COC not minimal"),
    AcasProperty("4", (1500.0, -0.06, 0.0, 1000.0, 700.0), (1800.0, 0.06, 0.0, 1200.0, 800.0),
                 "all but N_1,7-9", "intruder directly ahead, moving away but slower: COC not minimal"),
    AcasProperty("5", (250.0, 0.2, -PI, 100.0, 0.0), (400.0, 0.4, -PI + 0.005, 400.0, 400.0), "N_1,1",
                 "near intruder on the left: strong right is minimal"),
    AcasProperty("6.1", (12000.0, 0.7, -PI, 100.0, 0.0), (62000.0, PI, -PI + 0.005, 1200.0, 1200.0), "N_1,1",
                 "intruder sufficiently far away (left half of property 6): COC minimal"),
    AcasProperty("6.2", (12000.0, -PI, -PI, 100.0, 0.0), (62000.0, -0.7, -PI + 0.005, 1200.0, 1200.0), "N_1,1",
                 "intruder sufficiently far away (right half of property 6): COC minimal"),
    AcasProperty("7", (0.0, -PI, -PI, 100.0, 0.0), (60760.0, PI, PI, 1200.0, 1200.0), "N_1,9",
                 "large vertical separation: never strong left or strong right"),
    AcasProperty("8", (0.0, -PI, -0.1, 600.0, 600.0), (60760.0, -0.75 * PI, 0.1, 1200.0, 1200.0), "N_2,9",
                 "large vertical separation, previous advisory weak left: COC or weak left"),
    AcasProperty("9", (2000.0, -0.4, -PI, 100.0, 0.0), (7000.0, -0.14, -PI + 0.01, 150.0, 150.0), "N_3,3",
                 "previous advisory weak right, intruder close at an angle: strong left"),
    AcasProperty("10", (36000.0, 0.7, -PI, 900.0, 600.0), (60760.0, PI, -PI + 0.01, 1200.0, 1200.0), "N_4,5",
                 "intruder far away: COC"),
]}

# What the differing-pairs benchmark runs by default: properties 1-5 and 7-10.
DEFAULT = ("1", "2", "3", "4", "5", "7", "8", "9", "10")


def get(name) -> AcasProperty:
  """The property called ``name`` ('1'..'10', '6.1', '6.2'; an int works too)."""
  key = str(name)
  if key not in PROPERTIES:
    raise KeyError(f"no ACAS Xu property {name!r}; there are {', '.join(PROPERTIES)}")
  return PROPERTIES[key]


def normalised_box(lower, upper, normalisation: Mapping) -> qb.Box:
  """A raw box mapped through the .nnet input normalisation, rounded outward to float32.

  Args:
    lower, upper: the raw corners.
    normalisation: mins, maxes, means and ranges of the inputs (``params['normalisation']``).

  Returns:
    ``Box((clip(lower) - means) / ranges, (clip(upper) - means) / ranges)``.
  """
  get64 = lambda name: np.asarray(normalisation[name], np.float64)
  lo = np.clip(np.asarray(lower, np.float64), get64("mins"), get64("maxes"))
  hi = np.clip(np.asarray(upper, np.float64), get64("mins"), get64("maxes"))
  return _outward_box((lo - get64("means")) / get64("ranges"), (hi - get64("means")) / get64("ranges"))


def _outward_box(lo: np.ndarray, hi: np.ndarray) -> qb.Box:
  # float32 corners that contain the float64 ones, so that nothing proved misses a point of the
  # decimal box; equal corners (property 4's psi) stay equal, being exact either way when 0.
  down = lo.astype(np.float32)
  down = np.where(down.astype(np.float64) > lo, np.nextafter(down, np.float32(-np.inf)), down)
  up = hi.astype(np.float32)
  up = np.where(up.astype(np.float64) < hi, np.nextafter(up, np.float32(np.inf)), up)
  return qb.Box(jnp.asarray(down, jnp.float32), jnp.asarray(up, jnp.float32))


if __name__ == "__main__":
  import argparse
  from pathlib import Path

  argparse.ArgumentParser(description="Prints the VNN-COMP ACAS Xu properties' boxes, raw and normalised for "
                          "net 1_1 (the module's PROPERTIES).").parse_args()

  path = Path(__file__).resolve().parents[1] / "qbound" / "data" / "ACASXU_run2a_1_1_batch_2000.nnet"
  _, params = qb.io.load_nnet(path)
  for prop in PROPERTIES.values():
    box = prop.normalised_box(params["normalisation"])
    fmt = lambda v: "(" + ", ".join(f"{float(x):.7g}" for x in np.asarray(v, np.float64)) + ")"
    print(f"property {prop.name:>4} ({prop.networks}): raw {fmt(prop.lower)} .. {fmt(prop.upper)}\n"
          f"{'':15}normalised {fmt(box.lower)} .. {fmt(box.upper)}")
