"""Which elements of which parameter a ZeRO flat partition holds.

DeepSpeed's ZeRO (and its ``BF16_Optimizer``) hands the optimizer one flat fp32 tensor per
parameter group (stages 1 and 2) or sub-group (stage 3): shapes are gone.  This module rebuilds
the map from DeepSpeed's own bookkeeping, once per flat tensor:

- stages 1/2 and ``BF16_Optimizer``: each original parameter's ``_hp_mapping`` gives the range of
  its row-major flattening held here and where that range sits in the flat tensor;
- stage 3: the sub-group flat tensor carries ``ds_id = "<first>_<last>"``; it concatenates this
  rank's chunk (``partition_numel()`` elements, rank ``r`` holding ``[r·pn, (r+1)·pn)``) of every
  parameter of the sub-group, in group order.

Every rank's pieces are then exchanged, so each rank knows who holds what of every matrix it
touches, and the map is checked against the real weights before it is used.

A piece's *rows* (``owned_rows``) are pure geometry of it: the optimizer's unit of work is a row
of ``n`` elements of the flattening, owned by the rank holding its first element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of a parameter's row-major flattening, held by ``rank``, at
    ``offset`` in that rank's flat tensor."""

    label: str
    shape: tuple[int, ...]
    start: int
    stop: int
    offset: int
    rank: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Rows:
    """The rows a piece owns, with rows of ``n`` elements of the parameter's flattening (the
    last row of the flattening may be shorter)."""

    first: int      # index of the first row it owns
    count: int      # rows it owns: those whose first element it holds
    lead: int       # elements at its start that belong to a row owned by another rank
    begin: int      # the owned rows are elements [begin, end) of the flattening
    end: int


def owned_rows(q: Piece, n: int) -> Rows:
    """The rows of ``n`` elements piece ``q`` owns: a row belongs to the rank holding its first
    element, so a row cut between ranks has exactly one owner."""
    numel = math.prod(q.shape)
    first = -(-q.start // n)
    count = max(0, -(-q.stop // n) - first)
    lead = min(first * n, q.stop) - q.start
    return Rows(first, count, lead, first * n, min((first + count) * n, numel))


def cut_rows(holders: list[Piece], n: int) -> list[int]:
    """Rows of a parameter split between two or more ranks."""
    return sorted({q.start // n for q in holders[1:] if q.start % n})


@dataclass
class FlatLayout:
    """The pieces of one flat tensor on this rank, and every rank's pieces of the same parameters."""

    pieces: list[Piece]
    holders: dict[str, list[Piece]]
    group: object
    rank: int
    world: int
    subgroups: dict[tuple[int, ...], object] = field(default_factory=dict)
    # filled by the optimizer that binds it: per parameter it does not leave to AdamW, its row
    # length and the ranks owning at least one of its rows
    row_length: dict[str, int] = field(default_factory=dict)
    owners: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # (rank, first row, row count) of every holder of a parameter whose rows two or more own
    splits: dict[str, tuple[tuple[int, int, int], ...]] = field(default_factory=dict)
    backend: str | None = None      # of the subgroups; None: the group's own
    # the rows of their whole matrices that the ``tensor_parallel="global"`` shards of this flat
    # tensor stand for (``tensor_parallel.WholeRows``); None when it holds none
    whole_rows: object = None
    # fused weights stepped as their logical blocks (``distributed.fused``): parameter label ->
    # {block label: Block}; each block's owners and splits are kept under its own label, and
    # (rank, first row of the block, row count) of every holder in ``block_rows``
    blocks: dict[str, dict] = field(default_factory=dict)
    block_rows: dict[str, tuple[tuple[int, int, int], ...]] = field(default_factory=dict)

    def is_shared(self, label: str) -> bool:
        return len(self.holders[label]) > 1

    def cut_into_rows(self, label: str, n: int) -> None:
        """Record that parameter ``label`` is worked on in rows of ``n`` elements: its owners
        (``owned_rows``) and, when two or more own rows, every holder's share."""
        rows = [(q.rank, owned_rows(q, n)) for q in self.holders[label]]
        self.row_length[label] = n
        self.owners[label] = tuple(rank for rank, r in rows if r.count)
        if len(self.owners[label]) > 1:
            self.splits[label] = tuple((rank, r.first, r.count) for rank, r in rows)

    def cut_into_blocks(self, label: str, blocks: dict) -> None:
        """Record that the fused parameter ``label``, cut into its rows, is stepped as its
        ``blocks`` (block label -> ``fused.Block``): each block a matrix whose rows are those
        its holders own of it (``Block.within``), with owners and splits as a parameter's."""
        n = self.row_length[label]
        self.blocks[label] = dict(blocks)
        for name, block in blocks.items():
            rows = []
            for q in self.holders[label]:
                r = owned_rows(q, n)
                at, spans = block.within(r.first, r.count)
                rows.append((q.rank, at, sum(b - a for a, b in spans)))
            self.block_rows[name] = tuple(rows)
            self.owners[name] = tuple(rank for rank, _, count in rows if count)
            if len(self.owners[name]) > 1:
                self.splits[name] = self.block_rows[name]


class LayoutError(RuntimeError):
    """The partition layout is not one this optimizer can work with."""


def deepspeed_managed(p: torch.Tensor) -> bool:
    """Whether DeepSpeed has taken the model parameter ``p`` over: ZeRO stage 3 marks it with
    ``ds_id``, stages 1/2 and ``BF16_Optimizer`` with ``_hp_mapping``."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def zero12_pieces(originals: list[tuple[str, torch.Tensor]], flat: torch.Tensor) -> tuple[list[Piece], object]:
    """Pieces of ``flat`` from the ``_hp_mapping`` of the group's original parameters."""
    pieces, group = [], None
    for label, p in originals:
        mapping = getattr(p, "_hp_mapping", None)
        group = getattr(p, "_dp_group", group)
        if mapping is None or not _same_storage(mapping.hp_fragment, flat):
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        pieces.append(Piece(label, tuple(p.shape), lp.start, lp.start + lp.numel, hp.start, -1))
    return pieces, group


def zero3_pieces(originals: list[tuple[str, torch.Tensor]], flat: torch.Tensor, rank: int) -> tuple[list[Piece], object]:
    """Pieces of a stage-3 sub-group flat tensor, from its ``ds_id`` and the parameters' chunks."""
    first, last = (int(x) for x in flat.ds_id.split("_"))
    ids = [getattr(p, "ds_id", None) for _, p in originals]
    try:
        lo, hi = ids.index(first), ids.index(last)
    except ValueError:
        raise LayoutError(f"stage-3 sub-group {flat.ds_id} does not match this parameter group") from None
    pieces, offset, group = [], 0, None
    for label, p in originals[lo:hi + 1]:
        pn, numel = p.partition_numel(), p.ds_numel
        group = p.ds_process_group
        start, stop = min(rank * pn, numel), min((rank + 1) * pn, numel)
        pieces.append(Piece(label, tuple(p.ds_shape), start, stop, offset, -1))
        offset += pn
    return pieces, group


def gather_holders(pieces: list[Piece], group, rank: int) -> dict[str, list[Piece]]:
    """Every rank's pieces of the parameters this flat tensor's group holds, by label."""
    mine = [Piece(q.label, q.shape, q.start, q.stop, q.offset, rank) for q in pieces]
    world = dist.get_world_size(group)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    holders: dict[str, list[Piece]] = {}
    for theirs in everyone:
        for q in theirs:
            if q.numel > 0:
                holders.setdefault(q.label, []).append(q)
    for label in holders:
        holders[label].sort(key=lambda q: q.start)
    return holders


def check_layout(layout: FlatLayout, flat: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
    """Refuse a map that does not reproduce the real weights (``values``: label -> this rank's
    view of the parameter's flattening, indexed like the pieces' ranges)."""
    for q in layout.pieces:
        if q.numel == 0 or q.label not in values:
            continue
        got = flat[q.offset:q.offset + q.numel]
        want = values[q.label].to(device=got.device, dtype=got.dtype)
        tol = 0 if values[q.label].dtype == flat.dtype else 1e-2
        if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol * 1e-2):
            raise LayoutError(
                f"the ZeRO partition map disagrees with the weights of {q.label} (elements "
                f"{q.start}:{q.stop}); this DeepSpeed version or configuration lays out partitions "
                f"in a way ds_lowrank does not understand (a known cause: "
                f"zero_optimization.round_robin_gradients=true, which must be false)"
            )
    for label, qs in layout.holders.items():
        covered = 0
        for q in qs:
            if q.start != covered:
                raise LayoutError(f"the pieces of {label} held across ranks leave a gap at element {covered}")
            covered = q.stop
        numel = 1
        for s in qs[0].shape:
            numel *= s
        if covered != numel:
            raise LayoutError(f"the pieces of {label} cover {covered} of its {numel} elements")


def subgroup(layout: FlatLayout, ranks: tuple[int, ...]):
    """The process group of the ranks (in ``layout.group``) that hold a matrix; made at bind time."""
    if len(ranks) == layout.world:
        return layout.group
    return layout.subgroups[ranks]


def new_groups(wanted, backend, gather: bool = True) -> dict:
    """Process groups over the rank tuples (global ranks) ``wanted`` here and, with ``gather``,
    over those every other rank wants; returns every group made, by its ranks.

    ``new_group`` is collective over the whole world and must be called by every rank with the
    same ranks in the same order, also for groups it is not part of: the wanted tuples are
    gathered over the world (collective; ``gather=False`` where every rank wants the same) and
    every rank creates all of them, sorted."""
    wanted = {tuple(ranks) for ranks in wanted}
    if gather:
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, sorted(wanted))
        wanted = {tuple(ranks) for theirs in every for ranks in theirs}
    return {ranks: dist.new_group(list(ranks), backend=backend) for ranks in sorted(wanted)}


def make_subgroups(layout: FlatLayout, rank_sets) -> None:
    """Create one process group per set of ranks (in ``layout.group``) of ``rank_sets`` that is
    neither a single rank nor the whole group (``new_groups``).  When ``layout.group`` is not the
    world (ZeRO partitions over the data-parallel group of each tensor-parallel rank), the other
    data-parallel groups bind their own partitions at the same time and want groups of other
    ranks, which every rank creates too.
    """
    def global_rank(r: int) -> int:
        return dist.get_global_rank(layout.group, r) if layout.group is not None else r
    wanted = [tuple(global_rank(r) for r in ranks) for ranks in set(rank_sets)
              if 1 < len(ranks) < layout.world and ranks not in layout.subgroups]
    local = {global_rank(r): r for r in range(layout.world)}
    for ranks, group in new_groups(wanted, layout.backend, gather=layout.world != dist.get_world_size()).items():
        if all(r in local for r in ranks):
            layout.subgroups[tuple(local[r] for r in ranks)] = group


def gloo_mirror(group):
    """A gloo process group over the ranks of ``group``, for collectives on CPU tensors where
    ``group`` is NCCL's.  Collective over the whole world; each rank may pass another group (its
    own data- or tensor-parallel group): ``new_groups`` makes every rank's."""
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
    return new_groups([ranks], "gloo")[ranks]
