"""Where a parameter's rows are held: one placement per case.

Each placement turns what torch, Megatron, DeepSpeed or FSDP2 hands the optimizer into row blocks
(``Matrix`` objects), a runner for their sums, and a ``finish`` (cut-row exchange, writing back,
AdamW on the parameters left dense).  The optimizer's ``step()`` reads: validate, then for each
placement: ``rows()`` → the algorithm's matrix step → ``finish()``.  A placement asks the
optimizer only what its ``Method`` gives it; nothing here calls back into the optimizer.

- ``whole``: parameters held whole (one process, DDP, Megatron's ``"local"`` shards);
- ``megatron``: Megatron's ``"global"`` tensor-parallel shards and fused weights' blocks;
- ``zero``: a DeepSpeed ZeRO flat partition (stages 1-3, ``BF16_Optimizer``);
- FSDP2's DTensor shards: ``optim.fsdp2.FSDP2Shards``, beside the DTensor geometry it uses.
"""

from .megatron import MegatronShards
from .method import Method, Placement
from .whole import WholeTensors
from .zero import ZeroPartition

__all__ = ["MegatronShards", "Method", "Placement", "WholeTensors", "ZeroPartition"]
