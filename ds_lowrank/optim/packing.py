"""Per-parameter state stored as slices of one buffer per bucket of same-shape matrices.

The batched math wants a ``(k, …)`` tensor; the optimizer's state is per parameter.  Stacking
every step would copy the whole error-feedback buffer twice per step, so instead each
parameter's state tensor is a view into one packed buffer, and the batched tensor is
recovered from the views for free.  Whenever the views are not consecutive in one storage
(first step, after ``load_state_dict``, a bucket whose members changed), the state is packed
anew: one copy, then none.
"""

from __future__ import annotations

import torch


def batched_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The ``(k, *shape)`` tensor whose slices are exactly ``tensors``, or ``None``."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    storage = first.untyped_storage()
    step = first.numel()
    for i, t in enumerate(tensors):
        if (t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() != first.storage_offset() + i * step):
            return None
    if first.storage_offset() + len(tensors) * step > storage.nbytes() // first.element_size():
        return None
    batch = first.new_empty(0)
    batch.set_(storage, first.storage_offset(), (len(tensors), *first.shape))
    return batch


def packed_state(states: list[dict], key: str) -> torch.Tensor:
    """``torch.stack([st[key] for st in states])`` that aliases the states, packing if needed."""
    tensors = [st[key] for st in states]
    batch = batched_view(tensors)
    if batch is None:
        batch = torch.stack(tensors)
        for st, view in zip(states, batch.unbind(0)):
            st[key] = view
    return batch
