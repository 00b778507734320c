"""Per-GPU memory of weights, gradients, fp32 master weights and optimizer state, before any GPU.

The optimizer state comes from the optimizers' own layout: each optimizer's ``state_shapes``
(the function that also allocates its state) applied to every parameter of a model built on the
meta device, so nothing the size of the model is allocated.  Under ZeRO the parameters are cut
as DeepSpeed cuts them, and each cut is given to the optimizer as ``optim.placements.zero`` does:

- stages 1 and 2 flatten each parameter group (in group order, padded to a multiple of
  ``2·dp`` elements) and give rank ``r`` the ``r``-th of ``dp`` equal parts; stage 3 cuts every
  parameter into ``dp`` parts of ``⌈numel/dp⌉`` elements (``distributed.zero_layout``);
- a dense (AdamW) parameter's piece keeps AdamW state for its elements;
- a compressed one's piece owns the rows (``row_length``) whose first element it holds and keeps
  ``state_shapes`` of those rows: the state that splits with the rows (``row_axes``) for them
  (what lies along the columns, ``column_axes``: LDAdam's and GaLore's ``r × n`` moments of a
  left projection or basis of a right one, Adapprox's column factor, by blocks of columns in
  proportion to the rows), and the rest (counters) whole on every rank owning rows of the
  matrix.  That replicated part is reported separately.

Under FSDP2 (``estimate_fsdp2``) every parameter is cut ``Shard(0)`` as torch.chunk cuts its
rows, and each rank keeps the state ``optim.fsdp2`` keeps: its rows, and its torch.chunk block of
what lies along a matrix's columns (whole where some rank holds no rows of the matrix).  With
torch's tensor parallelism on a ``(dp, tp)`` mesh (``tp`` > 1; ``fsdp2_tp_state``), the
projections, embeddings and LM head are split along ``TP_SPLIT``'s dimension (``ColwiseParallel``
/ ``RowwiseParallel``, torchtitan's plan) and every parameter's rows over ``dp``; what a rank
keeps follows the group's ``tensor_parallel``: ``"global"``, the whole matrix's state, its rows
split over every rank as the optimizer steps them; ``"local"``, its TP shard's state, the shard a
matrix of its own split over ``dp``.  Whether a matrix is compressed (``within_adamw``) is
decided on its whole shape in both modes, as the optimizer decides it.

Stage semantics: stage 1 partitions the optimizer state and the fp32 master weights over the
data-parallel ranks, stage 2 also the gradients, stage 3 also the (bf16) weights.  Tensor
parallelism (Megatron) divides the attention and MLP projections (q, k, v, gate, up by rows;
o, down by columns), the embeddings and the LM head (by vocabulary rows); norms are replicated.
Each shard is then a matrix of its own (``tensor_parallel="local"``, the default).

AdamW's state is counted as torch's AdamW keeps it (``adamw_state_shapes``): two float32
moments per element held and a 4-byte step per tensor (per piece under ZeRO).  DeepSpeed's own
Adam keeps one step per parameter group, a difference of 4 bytes per tensor.  What is not
counted: activations, communication buffers, DeepSpeed's padding of the flat weight and
gradient buffers beyond the partition sizes, allocator fragmentation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .distributed.zero_layout import Piece
from .optim import Adapprox, GaLoreAdamW, LDAdam, MicroAdam
from .optim.base import CATEGORIES, CompressedOptimizer
from .optim.dense_adamw import adamw_state_shapes
from .distributed.zero_layout import owned_rows

OPTIMIZERS = {"adamw": None, "ldadam": LDAdam, "galore": GaLoreAdamW, "adapprox": Adapprox,
              "microadam": MicroAdam}

# Megatron's split of HF Llama's weights: name pattern -> the dimension divided by the TP size
TP_SPLIT = ((r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", 0),   # column-parallel
            (r"\.(o_proj|down_proj)\.weight$", 1),                          # row-parallel
            (r"(^|\.)(embed_tokens|lm_head)\.weight$", 0))                  # vocabulary-parallel

WEIGHT_BYTES = 2        # bf16 weights and gradients, fp32 master weights (configs/ldadam_zero2.json)
GRAD_BYTES = 2
MASTER_BYTES = 4
ALIGNMENT = 2           # DeepSpeed's stage 1/2 flat buffers: a multiple of 2·dp elements
# settings of the compressed group that are not constructor arguments
GROUP_KEYS = ("within_adamw", "tensor_parallel")


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]      # of the shard a TP rank holds (the whole parameter without TP)
    group: int                  # index of its parameter group (0: compressed, 1: dense)
    tp_axis: int | None = None  # the dimension tensor parallelism splits (``TP_SPLIT``); None: replicated

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tp_axis(name: str, shape: tuple[int, ...]) -> int | None:
    """The dimension of parameter ``name`` tensor parallelism splits (``TP_SPLIT``), or None."""
    for pattern, dim in TP_SPLIT:
        if re.search(pattern, name) and len(shape) == 2:
            return dim
    return None


def tp_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape of the shard of parameter ``name`` each of ``tp`` tensor-parallel ranks holds."""
    dim = tp_axis(name, shape)
    if dim is None:
        return tuple(shape)
    if shape[dim] % tp:
        raise ValueError(f"{name}: dimension {dim} of {tuple(shape)} does not divide by tp={tp}")
    out = list(shape)
    out[dim] //= tp
    return tuple(out)


@lru_cache(maxsize=16)
def model_params(preset: str, tp: int = 1) -> tuple[Param, ...]:
    """The trainable parameters of a model preset (``configs/models``), built on the meta device,
    in the order of ``lowrank_param_groups``' two groups (compressed matrices, then dense
    embeddings, LM head and non-matrices), with their tensor-parallel shard shapes."""
    from .param_groups import lowrank_param_groups
    from .training.models import build_model, load_preset

    model = build_model(load_preset(preset), 1, device="meta")
    out = []
    for group in lowrank_param_groups(model):
        g = 0 if group["compress"] else 1
        out += [Param(name, tp_shape(name, tuple(p.shape), tp), g, tp_axis(name, tuple(p.shape)))
                for name, p in group["params"]]
    return tuple(out)


def optimizer_groups(kind: str, **options) -> list[dict] | None:
    """The two parameter groups' settings of optimizer ``kind`` built with ``options`` (its
    defaults for the rest): ``[compressed group, dense group]``; ``None`` for AdamW."""
    cls = OPTIMIZERS[kind]
    if cls is None:
        return None
    options = dict(options)
    group_only = {k: options.pop(k) for k in GROUP_KEYS if k in options}
    probe = torch.nn.Parameter(torch.empty(1, device="meta"))
    defaults = dict(cls([probe], **options).defaults)
    defaults.pop("params", None)
    return [{**defaults, **group_only, "compress": True}, {**defaults, "compress": False}]


def pieces(params, stage: int, dp: int) -> list[list[Piece]]:
    """Per data-parallel rank, the pieces of each parameter it holds (``Piece.offset`` unused)."""
    out: list[list[Piece]] = [[] for _ in range(dp)]
    if stage == 0 or dp == 1:
        for r in range(dp):
            out[r] = [Piece(p.name, p.shape, 0, p.numel, 0, r) for p in params]
        return out
    if stage == 3:
        for p in params:
            pn = -(-p.numel // dp)
            for r in range(dp):
                start, stop = min(r * pn, p.numel), min((r + 1) * pn, p.numel)
                if stop > start:
                    out[r].append(Piece(p.name, p.shape, start, stop, 0, r))
        return out
    for g in sorted({p.group for p in params}):
        members = [p for p in params if p.group == g]
        total = sum(p.numel for p in members)
        size = -(-total // (ALIGNMENT * dp)) * ALIGNMENT       # elements per rank
        offset = 0
        for p in members:
            first, last = offset // size, (offset + p.numel - 1) // size
            for r in range(first, last + 1):
                start = max(offset, r * size) - offset
                stop = min(offset + p.numel, (r + 1) * size) - offset
                out[r].append(Piece(p.name, p.shape, start, stop, 0, r))
            offset += p.numel
    return out


@dataclass
class RankMemory:
    """Bytes one GPU holds."""

    weights: int = 0
    gradients: int = 0
    master: int = 0
    state: int = 0
    state_by_category: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    replicated: int = 0          # of ``state``: copies kept whole on each rank owning rows

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.master + self.state


def _category(cls, key: str) -> str:
    return (cls.state_categories if cls is not None else CompressedOptimizer.state_categories).get(key, "counters")


def piece_state(cls, groups: list[dict] | None, group_index: int, q: Piece,
                dtype: torch.dtype = torch.float32, whole: bool = False, owners: int = 1) -> tuple[dict, int]:
    """The state (``state_shapes``) optimizer ``cls`` (``None``: AdamW) keeps for piece ``q`` of
    a parameter of group ``groups[group_index]``, and the bytes of it kept whole on each of the
    ``owners`` ranks owning rows of the parameter (0 unless two or more do).  ``whole``: the
    parameter is held whole, as in one process."""
    held = q.stop - q.start
    if cls is None:
        return adamw_state_shapes((held,) if not whole else q.shape, dtype), 0
    group = groups[group_index]
    n = cls.row_length(group, q.shape)
    if n is None:
        return adamw_state_shapes((held,) if not whole else q.shape, dtype), 0
    if whole:
        return cls.state_shapes(group, q.shape, None, dtype), 0
    rows = owned_rows(q, n)
    if not rows.count:
        return {}, 0
    two_d = len(q.shape) == 2 and n == q.shape[1]
    span = rows.end - rows.begin
    shapes = cls.state_shapes(group, q.shape, (rows.count, n) if two_d else (span,), dtype,
                              first_row=rows.first if two_d else None)
    split = cls.row_axes(group, q.shape)
    replicated = sum(math.prod(s) * dt.itemsize for k, (s, dt) in shapes.items() if k not in split) \
        if owners > 1 else 0
    return shapes, replicated


def estimate(preset: str | None, optimizer, zero: int = 0, dp: int = 1, tp: int = 1,
             params=None, groups: list[dict] | None = None,
             **options) -> list[RankMemory]:
    """Per data-parallel rank (of any TP rank: they are alike), the bytes of one GPU.

    ``optimizer``: a name of ``OPTIMIZERS`` (with ``options`` for it; ``optimizer_groups``) or an
    optimizer class with its parameter ``groups`` (``Param.group`` indexes them).  ``params``
    replaces the preset's (``model_params``)."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, not {zero}")
    if dp < 1 or tp < 1:
        raise ValueError(f"dp and tp must be positive, not dp={dp}, tp={tp}")
    params = model_params(preset, tp) if params is None else params
    if isinstance(optimizer, str):
        cls, groups = OPTIMIZERS[optimizer], optimizer_groups(optimizer, **options)
    else:
        cls = optimizer
    group_of = {p.name: p.group for p in params}
    per_rank = pieces(params, zero, dp)
    whole = zero == 0 or dp == 1
    # ranks owning rows of each compressed parameter, for the replicated part
    owners: dict[str, int] = {}
    if cls is not None and not whole:
        for rank_pieces in per_rank:
            for q in rank_pieces:
                n = cls.row_length(groups[group_of[q.label]], q.shape)
                if n is not None and owned_rows(q, n).count:
                    owners[q.label] = owners.get(q.label, 0) + 1
    cache: dict = {}
    out = []
    total_numel = sum(p.numel for p in params)
    for rank_pieces in per_rank:
        mem = RankMemory()
        held = sum(q.stop - q.start for q in rank_pieces)
        mem.weights = WEIGHT_BYTES * (held if zero == 3 else total_numel)
        mem.gradients = GRAD_BYTES * (held if zero >= 2 else total_numel)
        mem.master = MASTER_BYTES * (held if zero >= 1 else total_numel)
        for q in rank_pieces:
            key = (q.label if cls is not None and not whole else q.shape, q.start, q.stop, group_of[q.label])
            if key not in cache:
                shapes, replicated = piece_state(cls, groups, group_of[q.label], q, whole=whole,
                                                 owners=owners.get(q.label, 1))
                by_cat = dict.fromkeys(CATEGORIES, 0)
                for k, (s, dt) in shapes.items():
                    by_cat[_category(cls, k)] += math.prod(s) * dt.itemsize
                cache[key] = (by_cat, replicated)
            by_cat, replicated = cache[key]
            for c, b in by_cat.items():
                mem.state_by_category[c] += b
            mem.replicated += replicated
        mem.state = sum(mem.state_by_category.values())
        out.append(mem)
    return out


def fsdp2_spans(rows: int, world: int) -> list[tuple[int, int]]:
    """``(first, count)`` of the rows each of ``world`` ranks holds under FSDP2's ``Shard(0)``:
    torch.chunk's split, ``⌈rows/world⌉`` per rank, so the last ranks may hold fewer or none."""
    size = -(-rows // world)
    return [(min(r * size, rows), max(0, min((r + 1) * size, rows) - r * size)) for r in range(world)]


def fsdp2_state(cls, group: dict | None, shape: tuple[int, ...], world: int, rank: int) -> dict:
    """The state (``state_shapes``) optimizer ``cls`` (``None``: AdamW) keeps on ``rank`` of
    ``world`` for a parameter of ``shape`` sharded ``Shard(0)`` by FSDP2, as ``optim.fsdp2`` lays
    it out: its rows held here; what lies along a matrix's columns (``column_axes``) in
    torch.chunk's block of the columns where every rank holds rows (``fsdp2.column_block``),
    whole otherwise; MicroAdam's top-k blocks as a ZeRO piece of the rows' span."""
    first, count = fsdp2_spans(shape[0], world)[rank]
    held = (count, *shape[1:])
    if cls is None or cls.row_length(group, shape) is None:
        return adamw_state_shapes(held)
    return _fsdp2_rows_state(cls, group, shape, world, rank)


def _fsdp2_rows_state(cls, group: dict, shape: tuple[int, ...], world: int, rank: int) -> dict:
    """``fsdp2_state`` of a parameter ``cls`` compresses."""
    spans = fsdp2_spans(shape[0], world)
    first, count = spans[rank]
    held = (count, *shape[1:])
    if getattr(cls, "rows_are_blocks", False):
        row = math.prod(shape[1:])
        q = Piece("", shape, first * row, (first + count) * row, 0, rank)
        shapes = piece_state(cls, [group], 0, q)[0] if count else {}
        # a rank owning no block keeps the same keys, empty, and the counters (``fsdp2._fresh_blocks``)
        return shapes or cls.state_shapes(group, shape, (0,))
    columns = None
    holders = sum(1 for _, c in spans if c)
    if len(shape) == 2 and holders > 1 and holders == world and cls.column_axes(group, shape):
        columns = fsdp2_spans(shape[1], world)[rank]
        columns = (columns[0], columns[0] + columns[1])
    return cls.state_shapes(group, shape, held, columns=columns)


def _nested(size: int, outer: int, o: int, inner: int, i: int) -> tuple[int, int]:
    """``(first, count)`` of part ``i`` of ``inner`` of part ``o`` of ``outer``: torch.chunk's
    split twice, as DTensor places a dimension sharded over two mesh dimensions."""
    first, count = fsdp2_spans(size, outer)[o]
    within, held = fsdp2_spans(count, inner)[i]
    return first + within, held


def fsdp2_tp_block(shape: tuple[int, ...], axis: int | None, dp: int, tp: int, d: int, t: int) -> tuple[int, ...]:
    """The block of a parameter of ``shape`` rank ``(d, t)`` of a ``(dp, tp)`` mesh holds, torch's
    tensor parallelism splitting ``axis`` over ``tp`` (None: replicated over it) and
    ``fully_shard`` the rows over ``dp``: a column-wise one's ``(_StridedShard(0), Shard(0))``
    (the TP shard's rows over ``dp``), a row-wise one's ``(Shard(0), Shard(1))``."""
    out = list(shape)
    if axis == 0:
        out[0] = _nested(shape[0], tp, t, dp, d)[1]
    else:
        out[0] = fsdp2_spans(shape[0], dp)[d][1]
        if axis == 1:
            out[1] = fsdp2_spans(shape[1], tp)[t][1]
    return tuple(out)


def fsdp2_tp_state(cls, group: dict | None, shape: tuple[int, ...], axis: int | None, dp: int, tp: int,
                   d: int, t: int) -> dict:
    """The state optimizer ``cls`` (``None``: AdamW) keeps on rank ``(d, t)`` of a ``(dp, tp)``
    mesh for a parameter of whole ``shape`` that torch's tensor parallelism splits along ``axis``
    (None: replicated over ``tp``) and ``fully_shard`` by rows over ``dp``, as ``optim.fsdp2``
    lays it out in the group's ``tensor_parallel`` mode:

    - AdamW (a parameter left dense too): its moments of the block held (``fsdp2_tp_block``);
    - ``"global"``: the whole matrix, its rows over every rank of the mesh as the rows stepped are
      placed (a column-wise weight's own; a row-wise one's moved to ``(Shard(0), Shard(0))``),
      what lies along its columns in blocks ``Shard`` along both mesh dimensions where every
      rank holds rows, whole otherwise;
    - ``"local"``: the TP shard, a matrix of its own, as ``fsdp2_state`` over ``dp`` (MicroAdam's
      blocks those of the TP shard's flattening)."""
    if cls is None or cls.row_length(group, shape) is None:
        return adamw_state_shapes(fsdp2_tp_block(shape, axis, dp, tp, d, t))
    if axis is None:
        return _fsdp2_rows_state(cls, group, shape, dp, d)
    if group.get("tensor_parallel", "local") == "global" and getattr(cls, "rows_are_blocks", False):
        raise NotImplementedError(f"{cls.__name__} with tensor_parallel='global' on FSDP2 combined with tensor "
                                  f"parallelism is refused (see optim.fsdp2); use tensor_parallel='local'")
    if getattr(cls, "rows_are_blocks", False) and shape[axis] % tp:
        raise NotImplementedError(f"{cls.__name__} on FSDP2 with tensor parallelism needs tensor-parallel shards "
                                  f"of one size (see optim.fsdp2): dimension {axis} of {shape} does not divide "
                                  f"by tp={tp}")
    if group.get("tensor_parallel", "local") == "global":
        rows = [_nested(shape[0], tp, tt, dp, dd) if axis == 0 else _nested(shape[0], dp, dd, tp, tt)
                for dd in range(dp) for tt in range(tp)]
        count = rows[d * tp + t][1]
        columns = None
        if len(shape) == 2 and dp * tp > 1 and all(c for _, c in rows) and cls.column_axes(group, shape):
            lo, width = _nested(shape[1], dp, d, tp, t)
            columns = (lo, lo + width)
        return cls.state_shapes(group, shape, (count, *shape[1:]), columns=columns)
    own = list(shape)
    own[axis] = fsdp2_spans(shape[axis], tp)[t][1]
    return _fsdp2_rows_state(cls, group, tuple(own), dp, d)


def estimate_fsdp2(preset: str | None, optimizer, world: int, params=None, groups: list[dict] | None = None,
                   tp: int = 1, **options) -> list[RankMemory]:
    """Per rank, the optimizer state of a model whose every parameter FSDP2 shards ``Shard(0)``
    over ``world`` ranks (``fsdp2_state``), and its fp32 sharded weights and gradients (no
    master copy); arguments as ``estimate``'s.  AdamW is torch's, on the DTensors.

    ``tp`` > 1: torch's tensor parallelism over ``tp`` of the ``world`` ranks, on a ``(world /
    tp, tp)`` mesh, splitting each parameter along its ``Param.tp_axis`` (``fsdp2_tp_state``, in
    each group's ``tensor_parallel`` mode); the ranks in the mesh's order."""
    if world < 1 or tp < 1 or world % tp:
        raise ValueError(f"world and tp must be positive and tp must divide world, not world={world}, tp={tp}")
    params = model_params(preset) if params is None else params
    if isinstance(optimizer, str):
        cls, groups = OPTIMIZERS[optimizer], optimizer_groups(optimizer, **options)
    else:
        cls = optimizer
    dp = world // tp
    out = []
    for rank in range(world):
        mem = RankMemory()
        d, t = divmod(rank, tp)
        for p in params:
            group = groups[p.group] if cls is not None else None
            axis = p.tp_axis if tp > 1 else None
            mem.weights += 4 * math.prod(fsdp2_tp_block(p.shape, axis, dp, tp, d, t))
            shapes = fsdp2_tp_state(cls, group, p.shape, axis, dp, tp, d, t)
            for k, (s, dt) in shapes.items():
                mem.state_by_category[_category(cls, k)] += math.prod(s) * dt.itemsize
        mem.gradients = mem.weights
        mem.state = sum(mem.state_by_category.values())
        out.append(mem)
    return out


def worst(ranks: list[RankMemory]) -> RankMemory:
    """The rank with the most bytes in all (the one a GPU must fit)."""
    return max(ranks, key=lambda m: (m.total, m.state))
