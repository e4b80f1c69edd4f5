"""Upper-bound methods: each ``method(fn, box) -> Box`` of proven output bounds."""

from qbound.bounds.crown import crown, crown_bounds
from qbound.bounds.interval import interval, interval_bounds

__all__ = ["interval", "interval_bounds", "crown", "crown_bounds"]
