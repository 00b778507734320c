"""How an optimizer's ``state`` is laid out, for every reader and writer of it.

``optimizer.state[p]`` is, by where the rows of ``p`` are held (its placement):

- a whole tensor (one process, a Megatron shard): ``{key: tensor}``;
- a fused weight stepped as its blocks (``optim.blocks``): ``{block name: {key: tensor}}``;
- a ZeRO flat partition (``optim.partitioned``; ``p`` is the flat tensor): ``{parameter label:
  piece}``, a piece being the state of the rows it owns, ``{key: tensor}``, plus ``METADATA``,
  which makes a saved partition self-describing: ``range``, the elements ``[start, stop)`` of the
  parameter's row-major flattening this rank holds, and ``shape``, the whole parameter's; a
  fused weight's piece holds ``{block name: {key: tensor}}`` instead of its keys, the state of
  the rows it owns of each block (``placements.zero.FusedBlockRows``);
- an FSDP2 DTensor parameter (``optim.fsdp2``): ``{key: DTensor or counter}``, of which this rank
  holds the ``local`` tensors (MicroAdam's: plain tensors of the blocks this rank owns, handed
  out as DTensors only by ``fsdp2.blocks_saved``).

:func:`held` turns one such entry into :class:`Held` items, one per parameter, block or piece,
each with its label and placement; :func:`tensors` lists what they hold as ``(label, key,
tensor)``, the bytes a process keeps.  The same walk reads a saved ``state_dict()``
(:func:`saved_pieces`) and restores the dtypes torch's loader casts (:func:`restore_dtypes`).
The maps of the flat partitions an optimizer has bound are keyed by :func:`layout_key`; one
of them (``partition_layout``) says where a piece lies in its partition (:func:`piece_span`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..distributed.zero_layout import Piece

RANGE, SHAPE = "range", "shape"
# what a piece of a ZeRO partition records about itself: not optimizer state
METADATA = (RANGE, SHAPE)

# placements (``Held.placement``)
WHOLE, BLOCK, PIECE, SHARDED = "whole", "block", "piece", "sharded"
# a block of a fused weight, of the rows a ZeRO piece owns (listed after its piece)
PIECE_BLOCK = "piece block"


@lru_cache(maxsize=None)
def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():     # a torch build without distributed support
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(v: Any) -> bool:
    # the class looked up once: readers walk every state tensor (state_bytes at logging steps)
    cls = _dtensor_class()
    return cls is not None and isinstance(v, cls)


def local(v: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``v``: its local tensor if it is a DTensor (whose ``numel`` is the
    whole tensor's), else itself."""
    return v.to_local() if _is_dtensor(v) else v


def block_label(label: str, name: str) -> str:
    """The label of block ``name`` of fused weight ``label`` (``optim.blocks``)."""
    return f"{label}[{name}]"


# -- a ZeRO piece's metadata ---------------------------------------------------------------------


def piece_metadata(q: Piece) -> dict[str, torch.Tensor]:
    """What the state of piece ``q`` records about itself (``METADATA``)."""
    return {RANGE: torch.tensor([q.start, q.stop], dtype=torch.int64),
            SHAPE: torch.tensor(q.shape, dtype=torch.int64)}


def is_piece(value: Any) -> bool:
    """Whether ``value`` is the state of a ZeRO piece (it carries its ``METADATA``)."""
    return isinstance(value, dict) and RANGE in value


def piece_range(piece: dict) -> tuple[int, int]:
    """The elements ``[start, stop)`` of its parameter's flattening a piece holds."""
    start, stop = (int(x) for x in piece[RANGE])
    return start, stop


def piece_shape(piece: dict) -> tuple[int, ...]:
    """The whole shape of the parameter a piece is part of."""
    return tuple(int(x) for x in piece[SHAPE])


def optimizer_state(st: dict) -> dict:
    """``st`` without the metadata of a piece: the optimizer's own state."""
    return {k: v for k, v in st.items() if k not in METADATA}


# -- walking the state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """The state of one parameter, block or piece as this process holds it."""

    label: str | None       # the parameter's (a block's: ``block_label``; a piece's: its own)
    placement: str          # WHOLE, BLOCK, PIECE, PIECE_BLOCK or SHARDED
    state: dict             # as stored (a piece's with its metadata): read and write keys here
    name: str | None = None     # its key in the parameter's entry: a block's or a piece's name

    def tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer's state tensors, as this rank holds them (DTensors: their local part)."""
        return {k: local(v) for k, v in self.state.items()
                if isinstance(v, torch.Tensor) and k not in METADATA}

    def nbytes(self) -> dict[str, int]:
        return {k: t.numel() * t.element_size() for k, t in self.tensors().items()}

    @property
    def range(self) -> tuple[int, int]:
        return piece_range(self.state)

    @property
    def shape(self) -> tuple[int, ...]:
        return piece_shape(self.state)


def held(st: dict, label: str | None = None, param: torch.Tensor | None = None) -> Iterator[Held]:
    """The items of ``st``, one entry ``optimizer.state[p]`` (or ``state_dict()["state"][i]``):
    the pieces of a ZeRO partition, the blocks of a fused weight, or the whole tensor's state,
    placed ``SHARDED`` if ``param`` (or a state tensor) is a DTensor.  ``label``: ``p``'s name
    (a piece names itself); a block's is ``label[block]``."""
    nested = [(k, v) for k, v in st.items() if isinstance(v, dict)]
    if len(nested) < len(st) or not st:
        # (next to blocks: state of the whole fused weight, which ``optim.blocks`` refuses to step)
        sharded = _is_dtensor(param) or any(_is_dtensor(v) for v in st.values())
        yield Held(label, SHARDED if sharded else WHOLE, st)
    for name, sub in nested:
        if is_piece(sub):
            yield Held(name, PIECE, sub, name)
            for block, of_block in sub.items():
                if isinstance(of_block, dict):
                    yield Held(block_label(name, block), PIECE_BLOCK, of_block, block)
        else:
            yield Held(name if label is None else block_label(label, name), BLOCK, sub, name)


def tensors(st: dict, label: str | None = None) -> Iterator[tuple[str | None, str, torch.Tensor]]:
    """``(label, key, tensor)`` of every state tensor held here in ``st`` (see :func:`held`)."""
    for h in held(st, label):
        for key, t in h.tensors().items():
            yield h.label, key, t


def restore_dtypes(saved: dict, loaded: dict) -> None:
    """Give each tensor of ``loaded`` (the same entry after torch's ``load_state_dict``, which
    casts state to the parameter's dtype) the dtype it was saved with, metadata included."""
    into = {h.label: h.state for h in held(loaded)}
    for h in held(saved):
        target = into[h.label]
        for key, value in h.state.items():
            if isinstance(value, torch.Tensor) and target[key].dtype != value.dtype:
                target[key] = value.to(device=target[key].device, copy=True)


def saved_pieces(sd: dict) -> Iterator[tuple[int, Held]]:
    """``(group index, piece)`` of every ZeRO piece in a saved ``state_dict()``.  A fused weight's
    piece holds its blocks' state (``{block: {key: tensor}}``, its ``PIECE_BLOCK`` items) in place of
    its own keys: ``checkpoint.blocks`` reads it with the layout the optimizer records
    (``state_dict()["fused"]``)."""
    group_of = {i: gi for gi, g in enumerate(sd["param_groups"]) for i in g["params"]}
    for index, st in sd["state"].items():
        for h in held(st):
            if h.placement == PIECE:
                yield group_of[index], h


# -- the maps of bound flat partitions ------------------------------------------------------------


def layout_key(flat: torch.Tensor) -> tuple[int, int, int]:
    """What identifies a flat partition across ``step()`` calls: DeepSpeed may hand over a new
    tensor object viewing the same elements."""
    return flat.untyped_storage().data_ptr(), flat.storage_offset(), flat.numel()


def piece_span(layout, label: str) -> tuple[int, int] | None:
    """Where parameter ``label``'s elements sit in a flat partition (``offset``, ``numel``), from
    the ``layout`` an optimizer bound at its first step on it (``partition_layout(flat)``);
    ``None`` when there is none yet, or it holds no piece of ``label``."""
    if layout is None:
        return None
    return next(((q.offset, q.numel) for q in layout.pieces if q.label == label), None)
