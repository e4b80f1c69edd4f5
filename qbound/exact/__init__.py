"""Exact maximal errors: complete methods for small ReLU networks."""

from qbound.exact.milp import MilpResult, milp

__all__ = ["MilpResult", "milp"]
