"""torch's AdamW <-> LDAdam or GaLore on the same model: FSDP2 (DTensor) or plain parameters.

A run trained with ``torch.optim.AdamW`` and checkpointed with ``torch.distributed.checkpoint``
is loaded the usual way into a torch AdamW (``get_optimizer_state_dict``, ``dcp.load``,
``set_optimizer_state_dict``); ``from_adamw`` then starts a ds_lowrank optimizer over the same
parameters from its state, and ``to_adamw`` goes back: it returns a torch AdamW holding the
converted state, which ``get_optimizer_state_dict`` saves as a checkpoint of torch's AdamW.

The compressed parameters convert through ``checkpoint.adam`` (the same estimates as the
DeepSpeed universal conversion: lossy, see there); the others keep their AdamW state.  Each
matrix is gathered whole once (an all-gather of its moments), converted on every rank, and each
rank keeps its rows, so every process must call these functions together.
"""

from __future__ import annotations

import torch

from ..optim import fsdp2
from ..optim.base import CompressedOptimizer, param_label
from .adam import adam_of_subspace

ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if fsdp2.is_sharded(t) else t


def _named(optimizer: CompressedOptimizer):
    for gi, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            yield group, param_label(group, gi, i), p


def from_adamw(adamw: torch.optim.Optimizer, optimizer: CompressedOptimizer) -> None:
    """Start ``optimizer`` from the state of torch's ``adamw`` over the same parameters.

    Parameters ``optimizer`` compresses start from Adam's moments carried into a subspace
    (``state_from_adam``: LDAdam and GaLore; the others refuse); the rest keep their AdamW
    state as it is.  Parameters without AdamW state start fresh.
    """
    for group, label, p in _named(optimizer):
        adam = adamw.state.get(p)
        if not adam:
            continue
        missing = [k for k in ADAM_KEYS if k not in adam]
        if missing or adam.get("max_exp_avg_sq") is not None:
            raise ValueError(f"{label}: not the state of torch's AdamW without amsgrad (keys {sorted(adam)})")
        step = torch.tensor(float(adam["step"]))
        shape = tuple(p.shape)
        if optimizer.row_length(group, shape) is None:
            optimizer.state[p] = {"exp_avg": adam["exp_avg"].clone(), "exp_avg_sq": adam["exp_avg_sq"].clone(),
                                  "step": step}
            continue
        whole = {"exp_avg": _whole(adam["exp_avg"]), "exp_avg_sq": _whole(adam["exp_avg_sq"]), "step": step}
        optimizer.state[p] = fsdp2.cut_whole_state(optimizer, group, label, p,
                                                   optimizer.state_from_adam(group, label, shape, whole))


def to_adamw(optimizer: CompressedOptimizer, **kwargs) -> torch.optim.AdamW:
    """A torch AdamW over ``optimizer``'s parameters, with its groups' ``lr``, ``betas``, ``eps``
    and ``weight_decay`` (``kwargs`` override them), holding Adam's state converted from
    ``optimizer``'s: the compressed parameters' carried out of the subspace
    (``checkpoint.adam``, LDAdam and GaLore), the others' as they are."""
    groups = [{"params": list(group["params"]),
               **{k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}, **kwargs}
              for group in optimizer.param_groups]
    adamw = torch.optim.AdamW(groups)
    cls = type(optimizer)
    for group, label, p in _named(optimizer):
        st = optimizer.state.get(p)
        if not st:
            continue
        shape = tuple(p.shape)
        if optimizer.row_length(group, shape) is None:
            adam = {k: st[k] for k in ADAM_KEYS}
        else:
            whole = {k: _whole(v) for k, v in st.items()}
            try:
                adam = adam_of_subspace(cls, group, shape, whole)
            except ValueError as err:
                raise ValueError(f"{type(optimizer).__name__}'s state of {label}: {err}") from None
            adam = {k: fsdp2.cut_rows(p, label, v) if k != "step" else v for k, v in adam.items()}
        adamw.state[p] = {"step": adam["step"].clone().float().cpu(), "exp_avg": adam["exp_avg"].clone(),
                          "exp_avg_sq": adam["exp_avg_sq"].clone()}
    return adamw
