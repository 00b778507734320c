"""The optimizers."""

from .adapprox import Adapprox
from .base import CompressedOptimizer
from .galore import GaLoreAdamW
from .ldadam import LDAdam
from .microadam import MicroAdam

# the base's earlier name, for code that checks isinstance against it
LowRankOptimizer = CompressedOptimizer

__all__ = ["Adapprox", "CompressedOptimizer", "GaLoreAdamW", "LDAdam", "LowRankOptimizer", "MicroAdam"]
