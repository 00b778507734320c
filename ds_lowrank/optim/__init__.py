"""The optimizers."""

from .adapprox import Adapprox
from .base import LowRankOptimizer
from .galore import GaLoreAdamW
from .ldadam import LDAdam
from .microadam import MicroAdam

__all__ = ["Adapprox", "GaLoreAdamW", "LDAdam", "LowRankOptimizer", "MicroAdam"]
