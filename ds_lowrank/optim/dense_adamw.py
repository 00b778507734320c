"""The dense AdamW path, for parameters that are not low-rank (norms, biases, embeddings).

It is torch's own fused AdamW kernel (on GPU and CPU; foreach elsewhere) driven with the low-rank
group's hyperparameters, so dense parameters share the optimizer's betas, bias correction and
decoupled weight decay.
"""

from __future__ import annotations

import math

import torch
from torch.optim.adam import adam


# A parameter's state as an optimizer lays it out: state key -> (shape, dtype).  Each optimizer
# has one function giving it (``state_shapes``), used both to allocate the state and to
# estimate it (``ds_lowrank.memory``) without allocating anything.
StateShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def shapes_bytes(shapes: StateShapes) -> int:
    """Bytes of the state ``shapes`` describes."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())


def adamw_state_shapes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> StateShapes:
    """AdamW's state of a parameter of ``shape`` and ``dtype``: the two moments in the
    parameter's dtype (float32 for fp32 master weights: 8 bytes per element) and a float32 step
    counter per tensor (4 bytes), as torch's AdamW keeps them."""
    return {"step": ((), torch.float32), "exp_avg": (tuple(shape), dtype), "exp_avg_sq": (tuple(shape), dtype)}


def dense_state(p: torch.Tensor, fused: bool) -> dict[str, torch.Tensor]:
    """Fresh AdamW state for ``p``; the step counter lives where the chosen kernel wants it."""
    shapes = adamw_state_shapes(tuple(p.shape), p.dtype)
    return {key: torch.zeros(shape, dtype=dtype, device=p.device if fused else "cpu") if key == "step"
            else torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            for key, (shape, dtype) in shapes.items()}


def adamw_step(params: list[torch.Tensor], states: list[dict], group: dict) -> None:
    """One AdamW step on ``params`` (all with valid gradients), states created lazily."""
    if not params:
        return
    # torch's fused kernel runs on CPU too, one pass over each tensor where foreach makes several
    # (a quarter to a half less time than foreach on the README's 2-core CPU)
    fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    step_device = None
    for p, st in zip(params, states):
        if "step" not in st:
            st.update(dense_state(p, fused))
        step_device = p.device if fused else torch.device("cpu")
        if st["step"].device != step_device:
            st["step"] = st["step"].to(step_device)
    beta1, beta2 = group["betas"]
    adam(
        params,
        [p.grad for p in params],
        [st["exp_avg"] for st in states],
        [st["exp_avg_sq"] for st in states],
        [],
        [st["step"] for st in states],
        foreach=not fused,
        fused=fused,
        # complex parameters step as pairs of reals (view_as_real), as torch's AdamW does;
        # the functional form does that only when told
        has_complex=any(p.is_complex() for p in params),
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )
