"""ds_lowrank: memory-efficient Adam-family optimizers for large-scale pretraining."""

from .optim import Adapprox, CompressedOptimizer, GaLoreAdamW, LDAdam, LowRankOptimizer, MicroAdam
from .integration.deepspeed import initialize, register_deepspeed_optimizers, unregister_deepspeed_optimizers
from .param_groups import lowrank_param_groups

__version__ = "0.1.0"

__all__ = ["initialize", "register_deepspeed_optimizers", "unregister_deepspeed_optimizers", "Adapprox", "GaLoreAdamW", "LDAdam", "CompressedOptimizer", "LowRankOptimizer", "MicroAdam", "lowrank_param_groups", "__version__"]
