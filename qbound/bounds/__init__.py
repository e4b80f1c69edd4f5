"""Upper-bound methods.

Each public method is shaped ``method(fn, box) -> Box`` of proven output bounds (``diff`` takes
the two networks); the ``*_bounds`` functions return every node's bounds of a traced graph.
"""

from qbound.bounds.alpha import crown_alpha_node, diff_alpha_bounds, diff_alpha_node
from qbound.bounds.bab import BabResult, branch_and_bound
from qbound.bounds.crown import crown, crown_bounds
from qbound.bounds.diff import diff, diff_bounds
from qbound.bounds.forward import forward_diff, forward_diff_batch, forward_diff_bounds
from qbound.bounds.forward_bab import forward_branch_and_bound
from qbound.bounds.host_bab import HostBabResult, host_branch_and_bound
from qbound.bounds.interval import interval, interval_bounds
from qbound.bounds.zonotope import diff_zonotope, diff_zonotope_batch, diff_zonotope_bounds

__all__ = [
    "BabResult",
    "branch_and_bound",
    "crown",
    "crown_alpha_node",
    "crown_bounds",
    "diff",
    "diff_alpha_bounds",
    "diff_alpha_node",
    "diff_bounds",
    "diff_zonotope",
    "diff_zonotope_batch",
    "diff_zonotope_bounds",
    "forward_branch_and_bound",
    "forward_diff",
    "forward_diff_batch",
    "forward_diff_bounds",
    "HostBabResult",
    "host_branch_and_bound",
    "interval",
    "interval_bounds",
]
