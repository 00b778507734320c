"""Whether a gradient can be stepped: some entry nonzero, none past a limit or not finite."""

from __future__ import annotations

import torch

# A 2-norm computed and rounded in low precision may fall a little short of the largest entry
# it bounds; a margin far above that rounding keeps the fast path exact.
_MARGIN = 1.0 + 2.0**-6


def gradient_flags(grads: list[torch.Tensor], limits: list[float]) -> tuple[list[bool], list[bool]]:
    """Per tensor, ``(over, nonzero)``: some entry is past its limit or not finite; some entry
    is not zero.  A zero-size tensor is neither.

    The same flags as the largest magnitude ``max|g|`` gives, at the cost of a 2-norm pass:
    ``max|g| ≤ ‖g‖₂``, so a finite 2-norm within the limit settles both flags (a zero norm means
    an all-zero tensor).  Only a tensor past that bound (rare: a skipped step, or one close to
    it) takes the exact maximum.  One host sync in the common case; a max-norm pass costs
    several times a 2-norm on CPUs."""
    over, nonzero = [False] * len(grads), [True] * len(grads)
    held = [i for i, g in enumerate(grads) if g.numel()]
    if not held:
        return over, nonzero
    norms = torch._foreach_norm([grads[i] for i in held], 2)
    device = norms[0].device
    values = torch.stack([n.float().to(device) for n in norms]).tolist()
    for i, norm in zip(held, values):
        if norm == 0:
            nonzero[i] = False
        elif not norm * _MARGIN <= limits[i]:          # NaN, inf, or possibly past the limit
            lo, hi = torch.aminmax(grads[i])
            largest = torch.maximum(-lo, hi).float().item()   # NaN stays NaN
            over[i] = not largest <= limits[i]
            nonzero[i] = largest > 0
    return over, nonzero
