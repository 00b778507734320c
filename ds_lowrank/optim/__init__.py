"""The optimizers."""

from .base import LowRankOptimizer
from .ldadam import LDAdam

__all__ = ["LDAdam", "LowRankOptimizer"]
