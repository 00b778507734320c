"""The optimizers."""

from .base import LowRankOptimizer
from .ldadam import LDAdam
from .microadam import MicroAdam

__all__ = ["LDAdam", "LowRankOptimizer", "MicroAdam"]
