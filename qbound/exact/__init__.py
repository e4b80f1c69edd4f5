"""Exact maximal errors: complete methods for small ReLU networks, and input grids cell by cell."""

from qbound.exact.grid import GridResult, grid_error
from qbound.exact.milp import MilpResult, milp

__all__ = ["GridResult", "MilpResult", "grid_error", "milp"]
