"""The ZeRO flat partition placement: the rows of a DeepSpeed flat partition.

What the optimizer receives under ZeRO is a flat fp32 tensor; ``zero_layout`` says which
elements of which parameter it holds.  Here those pieces become what the algorithms work on:

- parameters the optimizer leaves to AdamW (norms, embeddings...) are elementwise: AdamW on the
  slices;
- every other parameter is cut into *rows*, the optimizer's unit of work (``row_length``): the
  rows of a matrix for the projection methods, top-k blocks of the flattening for MicroAdam, the
  whole of a vector for Adapprox's dense second moment.  A parameter held whole by this rank is
  exactly the single-process case, on views of the flat tensor, with no communication;
- a parameter split between ranks is cut at arbitrary elements: a partial row, whole rows, a
  partial row.  Each row belongs to the rank holding its first element.  Before the step the
  other holders send their parts of such *cut rows* to the owner; each rank then works on whole
  rows (``Matrix.first_row``…), with a reducer summing over the ranks owning rows of it; after
  the step the owner sends back the update of the parts it does not hold.  Both exchanges are
  one all-reduce over a buffer with a slot per cut row, issued only when cut rows exist.

A Megatron shard of a ``tensor_parallel="global"`` group (under ``mpu=parallel_state``, ZeRO
partitions each TP rank's shards over its data-parallel group) is stepped as part of its whole
matrix: the rows it owns become rows of the whole matrix (``tensor_parallel.WholeRows``, a
row-parallel shard's brought to their rank with every column), a second batch of matrices whose
sums go over every (TP, DP) rank owning rows of them, after the cut-row exchange of its own
partition as above.

Every rank walks the same lists in the same order, so collectives line up.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ...distributed import tensor_parallel as tp
from ...distributed.comm import all_reduce
from ...distributed.phases import SplitRunner
from ...distributed.zero_layout import (FlatLayout, Piece, check_layout, cut_rows, gather_holders, gloo_mirror,
                                        make_subgroups, owned_rows, subgroup, zero3_pieces, zero12_pieces)
from ...linalg import gradient_flags
from ..blocks import block_label
from ..dense_adamw import adamw_step
from ..matrix import Matrix
from ..state_layout import is_piece, layout_key, piece_metadata
from .megatron import BlockStep, check_blocks, check_block_state, fused_weights, refuse_on_partitions
from .method import Method, Placement, check_dense_state


def is_partition(group_originals: list, flat: torch.Tensor) -> bool:
    """Whether ``flat`` is a ZeRO flat partition standing for the group's original parameters."""
    if flat.dim() != 1 or any(flat is p for _, p in group_originals):
        return False
    return hasattr(flat, "ds_id") or any(hasattr(p, "_hp_mapping") for _, p in group_originals)


def bind(originals: list[tuple[str, torch.Tensor]], flat: torch.Tensor, row_length) -> FlatLayout:
    """Build and check the layout of ``flat`` (collective: every rank binds the same group together).

    ``row_length(label, shape)`` is the optimizer's row length for parameter ``label`` of that
    shape, or ``None`` for one it updates with AdamW.
    """
    if hasattr(flat, "ds_id"):
        probe = next(p for _, p in originals)
        rank = dist.get_rank(probe.ds_process_group)
        pieces, group = zero3_pieces(originals, flat, rank)
        values = {lb: p.ds_tensor.reshape(-1) for lb, p in originals if hasattr(p, "ds_tensor")}
        values = {q.label: values[q.label][:q.numel] for q in pieces if q.label in values}
    else:
        pieces, group = zero12_pieces(originals, flat)
        rank = dist.get_rank(group)
        by_label = dict(originals)
        values = {q.label: by_label[q.label].detach().reshape(-1)[q.start:q.stop] for q in pieces}
    layout = FlatLayout(pieces, gather_holders(pieces, group, rank), group, rank, dist.get_world_size(group))
    check_layout(layout, flat.detach(), values)
    if flat.device.type == "cpu" and dist.get_backend(group) != "gloo":
        # offloaded partitions: the step's tensors are on the CPU, which NCCL cannot carry
        layout.group, layout.backend = gloo_mirror(group), "gloo"
    for label, qs in layout.holders.items():
        n = row_length(label, qs[0].shape)
        if n is not None:
            layout.cut_into_rows(label, n)
    make_subgroups(layout, set(layout.owners.values()))
    return layout


class CutRowExchange:
    """A buffer with one slot per cut row of the split parameters, summed over all ranks."""

    def __init__(self, layout: FlatLayout, labels: list[str], like: torch.Tensor) -> None:
        self.slots: dict[tuple[str, int], tuple[int, int]] = {}
        size = 0
        for label in labels:
            n, numel = layout.row_length[label], math.prod(layout.holders[label][0].shape)
            for row in cut_rows(layout.holders[label], n):
                length = min(n, numel - row * n)
                self.slots[(label, row)] = (size, length)
                size += length
        self.buffer = like.new_zeros(size) if size else None
        self.group = layout.group

    def slot(self, label: str, row: int) -> torch.Tensor:
        start, length = self.slots[(label, row)]
        return self.buffer[start:start + length]

    def exchange(self) -> None:
        if self.buffer is not None:
            all_reduce(self.buffer, self.group, purpose="exchange")



def global_shards(method: Method, group: dict, originals: list, world: int) -> dict[str, tuple[int, tuple[int, int]]]:
    """The parameters of ``originals`` a ``tensor_parallel="global"`` group steps as parts of their
    whole matrices: label -> ``(partition_dim, whole shape)`` at TP size ``world``
    (``CompressedOptimizer._global_shard``)."""
    if group.get("tensor_parallel", "local") != "global":
        return {}
    out = {}
    for label, p in originals:
        shape = tp.shard_shape(p)
        if tp.is_shard(p) and method.rules.row_length({**group, "within_adamw": False}, shape) is not None:
            dim = getattr(p, "partition_dim", None)
            if dim not in (0, 1):
                raise ValueError(f"{label}: a tensor-parallel shard must have partition_dim 0 or 1, not {dim!r}")
            whole = list(shape)
            whole[dim] *= world
            out[label] = (dim, tuple(whole))
    return out


def bound_layout(method: Method, group: dict, flat: torch.Tensor, originals: list, layouts: dict,
                 tensor_parallel: tp.TensorParallel | None = None) -> FlatLayout:
    """The partition map of ``flat`` from ``layouts`` (the optimizer's, by storage), bound and
    checked the first time it is seen (a collective).  ``tensor_parallel``: the TP group, for a
    ``tensor_parallel="global"`` group holding shards, whose rows are bound as rows of their
    whole matrices (``tensor_parallel.WholeRows``; collective over the world)."""
    key = layout_key(flat)
    if key not in layouts:
        refuse_on_partitions(method.rules, group, originals)
        shards = global_shards(method, group, originals, tensor_parallel.world) if tensor_parallel else {}
        weights = fused_weights(method.rules, group, originals)

        def row_length(label: str, shape: tuple[int, ...]) -> int | None:
            if label in weights:
                return shape[1]         # cut into rows, then into its blocks' rows
            if label in shards:
                # compressed or not as the whole matrix; cut into the shard's own rows
                return shape[1] if method.rules.row_length(group, shards[label][1]) is not None else None
            return method.rules.row_length(group, shape)
        layout = bind(originals, flat, row_length)
        for label, qs in layout.holders.items():
            if label in weights:
                # each block checked as the matrix it is: in global mode the whole logical one
                p, blocks = weights[label]
                check_blocks(method, group, label, p, tensor_parallel.world if label in shards else None,
                             label in shards)
                layout.cut_into_blocks(label, {block_label(label, b): b for b in blocks})
            elif label in layout.row_length:
                shape = shards[label][1] if label in shards else qs[0].shape
                method.check_shape(group, label, torch.empty(shape, device="meta"))
        if layout.blocks:
            # the process groups of the blocks' holders (collective over the world, as ``bind``'s)
            make_subgroups(layout, set(layout.owners.values()))
        if shards:
            if layout.backend == "gloo" and dist.get_backend(tensor_parallel.group) != "gloo":
                # offloaded partitions (see ``bind``): the rows moved over the TP group are on the CPU too
                tensor_parallel = tp.TensorParallel(gloo_mirror(tensor_parallel.group))
            known = {ranks: g for other in layouts.values() if other.whole_rows is not None
                     and other.backend == layout.backend for ranks, g in other.whole_rows.groups.items()}
            layout.whole_rows = tp.bind_whole_rows(layout, shards, tensor_parallel, known, layout.backend)
        layouts[key] = layout
    return layouts[key]


def cut_for_piece(rules, group: dict, q: Piece, whole: dict[str, torch.Tensor], device,
                  rows: tp.ShardRows | None = None) -> dict[str, torch.Tensor]:
    """The state of piece ``q`` (as the optimizer class ``rules`` keeps it on a ZeRO rank) from
    the whole state one process holds (``checkpoint.pieces.merge`` is the inverse); ``rows``: of
    a global tensor-parallel shard, the rows of its whole matrix the piece steps, cut from that
    matrix's state (``checkpoint.pieces.merge_rows``)."""
    n = rules.row_length(group, q.shape) if rows is None else rows.shape[1]
    out = {}
    if n is None:
        for key, v in whole.items():
            out[key] = v.clone() if v.dim() == 0 else v.reshape(-1)[q.start:q.stop].clone()
    else:
        held = rows if rows is not None else owned_rows(q, n)
        first, count = held.first, held.count
        if not count:
            return {}
        axes = rules.row_axes(group, q.shape if rows is None else rows.shape)
        for key, v in whole.items():
            if key in axes:
                dim, at = axes[key]
                lo, hi = at(first), at(first + count)
                v = v.narrow(dim, lo, hi - lo)
            out[key] = v.clone()
    return {k: v.to(device) for k, v in out.items()}


def _valid(layout: FlatLayout, flat_grad: torch.Tensor, labels: list[str], limit) -> dict[str, bool]:
    """Per parameter: gradient not all zero and no entry above ``limit(label)`` (so finite:
    ``CompressedOptimizer.gradient_limit``), agreed by all holders (one all-reduce when parameters
    are split between ranks; one more over the TP × DP ranks for global tensor-parallel shards,
    whose flags are the whole matrix's: a shard alone may be all zero)."""
    held = [q for q in layout.pieces if q.numel]
    over, nonzero = gradient_flags([flat_grad[q.offset:q.offset + q.numel] for q in held],
                                   [limit(q.label) for q in held])
    seen = {q.label: (o, nz) for q, o, nz in zip(held, over, nonzero)}
    for q in layout.pieces:
        seen.setdefault(q.label, (False, False))
    whole = layout.whole_rows
    wide = [lb for lb in labels if whole is not None and lb in whole.shapes]
    shared = [lb for lb in labels if layout.is_shared(lb) and lb not in wide]
    flags = {}
    for agreed, group in ((shared, layout.group), (wide, whole.grid if whole is not None else None)):
        if not agreed:
            continue
        # per parameter: [any holder saw a value past the limit or not finite, any holder saw a
        # nonzero value]
        vec = flat_grad.new_zeros(2 * len(agreed), dtype=torch.float32)
        for i, lb in enumerate(agreed):
            if lb in seen:
                vec[2 * i], vec[2 * i + 1] = float(seen[lb][0]), float(seen[lb][1])
        all_reduce(vec, group, op=dist.ReduceOp.MAX, purpose="valid")
        vals = vec.tolist()
        for i, lb in enumerate(agreed):
            flags[lb] = vals[2 * i] == 0 and vals[2 * i + 1] > 0
    for lb, (o, nz) in seen.items():
        if lb not in flags:
            flags[lb] = nz and not o
    return flags


class ZeroPartition(Placement):
    """One flat partition of a parameter group under ZeRO (stages 1-3, or DeepSpeed's
    ``BF16_Optimizer``).

    ``originals``: the group's parameters as constructed (names and shapes), which ``flat`` is
    mapped back to (``layouts``: the optimizer's maps, bound at the first step, a collective).
    ``pending_states`` / ``pending_weights``: whole states and fp32 weights by parameter name,
    waiting to be cut for the pieces held here (``load_whole_state``); each is taken from them
    the first time its piece is seen."""

    def __init__(self, method: Method, group: dict, flat: torch.Tensor, originals: list, layouts: dict,
                 pending_states: dict, pending_weights: dict, tensor_parallel: tp.TensorParallel | None = None
                 ) -> None:
        self.method, self.group, self.flat = method, group, flat
        self.originals, self.layouts = originals, layouts
        self.pending_states, self.pending_weights = pending_states, pending_weights
        self.tensor_parallel = tensor_parallel
        self.states = method.state[flat]

    def rows(self) -> list[tuple[list[Matrix], SplitRunner]]:
        flat, group = self.flat, self.group
        layout = self.layout = bound_layout(self.method, group, flat, self.originals, self.layouts,
                                            self.tensor_parallel)
        whole = layout.whole_rows
        grad = flat.grad
        self._restore_weights()
        labels = sorted(layout.holders)

        def limit(lb: str) -> float:
            # a global shard's is the whole matrix's (as at ZeRO stage 0)
            shape = whole.shapes[lb] if whole is not None and lb in whole.shapes else layout.holders[lb][0].shape
            return self.method.rules.gradient_limit(group, tuple(shape), flat.dtype)
        valid = _valid(layout, grad, labels, limit)
        mine = [q for q in layout.pieces if q.numel]
        self.skipped = sum(1 for q in mine if not valid[q.label])
        split = [lb for lb in labels if lb in layout.row_length and valid.get(lb) and layout.is_shared(lb)]
        pieces = [q for q in mine if q.label in layout.row_length and valid[q.label]]
        self.owned = OwnedRows(pieces, lambda q: (flat, grad), self.piece_state, layout, split, flat)
        # the leftovers stepped elementwise in ``finish``, after the rows, whose checks (in the
        # matrix step) may still refuse the step
        self.dense = [q for q in mine if q.label not in layout.row_length and valid[q.label]]
        self.blocks = FusedBlockRows(self.method, group, self.owned, layout,
                                     [lb for lb in sorted(layout.blocks) if valid.get(lb)])
        # the rows stepped as parts of other matrices: fused weights' (as their blocks) and global
        # shards' (as rows of their whole matrices)
        elsewhere = set(layout.blocks) | (set(whole.rows) if whole is not None else set())
        batches = [([m for m in self.owned.matrices if m.label not in elsewhere] + self.blocks.local,
                    SplitRunner(lambda holders: subgroup(layout, holders)))]
        self.whole = None
        if whole is not None:
            valid_rows = sorted(lb for lb in whole.rows if valid.get(lb))
            self.whole = WholeMatrixRows(self.owned, whole, valid_rows)
            batches.append((self.whole.matrices + self.blocks.wide, SplitRunner(whole.group_for)))
        return batches

    def finish(self) -> None:
        self.blocks.finish(self.group)
        if self.whole is not None:
            self.whole.finish()
        self.owned.finish(self.group["lr"], self.group["weight_decay"])
        if self.dense:
            flat, grad = self.flat, self.flat.grad
            views = [flat[q.offset:q.offset + q.numel] for q in self.dense]
            for v, q in zip(views, self.dense):
                v.grad = grad[q.offset:q.offset + q.numel]
            adamw_step(views, [self.piece_state(q) for q in self.dense], self.group)
            for v in views:
                v.grad = None

    def piece_state(self, q: Piece) -> dict:
        """The state of one piece, with the metadata that makes a saved partition
        self-describing; cut from a pending whole state when there is one."""
        st = self.states.setdefault(q.label, {})
        if not is_piece(st):
            st.update(piece_metadata(q))
            whole = self.pending_states.pop(q.label, None)
            if whole is not None and q.label in self.layout.blocks:
                st.update(self._block_states(q, whole))
            elif whole is not None:
                # a global shard's state is its whole matrix's (``checkpoint.universal``)
                shard = self.layout.whole_rows.rows.get(q.label) if self.layout.whole_rows is not None else None
                st.update(cut_for_piece(self.method.rules, self.group, q, whole, self.flat.device, shard))
        return st

    def _block_states(self, q: Piece, whole: dict) -> dict:
        """The state of the rows piece ``q`` owns of each block of a fused weight, cut from the
        blocks' whole states (``checkpoint.blocks``): in global mode those of the whole logical
        matrices (the rows ``layout.whole_rows`` gives it), else of this shard's blocks."""
        n = self.layout.row_length[q.label]
        owned = owned_rows(q, n)
        wide = self.layout.whole_rows
        out = {}
        for name, block in self.layout.blocks[q.label].items():
            at, spans = block.within(owned.first, owned.count)
            count = sum(b - a for a, b in spans)
            if not count or block.name not in whole:
                continue
            shape = stepped_block(self.layout, q.label, name)
            first = wide.rows[name].first if wide is not None and name in wide.rows else at
            if self.method.rules.is_compressed_shape(self.group, shape):
                rows = tp.ShardRows(tuple(shape), 0, first, count, (), ())
                out[block.name] = cut_for_piece(self.method.rules, self.group, q, whole[block.name], self.flat.device,
                                                rows)
            else:
                # AdamW's state of a block kept dense: a row of moments per row
                out[block.name] = {k: (v if v.dim() == 0 else v.narrow(0, first, count)).clone().to(self.flat.device)
                                   for k, v in whole[block.name].items()}
        return out

    def _restore_weights(self) -> None:
        """Copy pending fp32 weights into the pieces of the flat partition, once."""
        flat = self.flat
        for q in self.layout.pieces:
            w = self.pending_weights.pop(q.label, None)
            if w is not None and q.numel:
                flat.detach()[q.offset:q.offset + q.numel] = w.reshape(-1)[q.start:q.stop].to(flat)


class WholeMatrixRows:
    """The rows a ZeRO partition owns of global tensor-parallel shards (``labels``, their gradients
    valid), as ``Matrix`` objects of their whole matrices (``tensor_parallel.WholeRows``), split by
    rows over every (TP, DP) rank owning rows of them.  A column-parallel shard's owned rows are
    such rows as they lie; a row-parallel shard's are brought to their rank with every column
    (``TensorParallel.rows_to_whole``) and its update sent back at ``finish``, before the cut-row
    exchange (the parts of a cut row held elsewhere are worked on as zeros, as ``_PieceRows``
    says, which the move carries like any other entry)."""

    def __init__(self, owned: "OwnedRows", whole, labels: list[str]) -> None:
        self.tensor_parallel = whole.tensor_parallel
        parts = {part.q.label: part for part in owned.parts if part.matrix is not None}
        # every TP rank at this data-parallel position owns the same rows of a row-parallel
        # shard (``bind_whole_rows``), so they move the same labels, in this order
        self.moved = [parts[lb] for lb in labels if whole.rows[lb].dim == 1 and lb in parts
                      and self.tensor_parallel.world > 1]
        blocks = [t for part in self.moved for t in (part.weight.view(-1, part.n), part.grad.view(-1, part.n))]
        got = self.tensor_parallel.rows_to_whole(blocks)
        self.weights = got[0::2]
        moved = {part.q.label: (w, g) for part, w, g in zip(self.moved, got[0::2], got[1::2])}
        self.matrices = []
        for lb in labels:
            rows = whole.rows[lb]
            if lb not in parts or not rows.count:
                continue
            m = parts[lb].matrix
            weight, grad = moved.get(lb, (m.weight, m.grad))
            shared = len(rows.holders) > 1
            self.matrices.append(Matrix(lb, weight, grad, m.state, rows.shape, rows.first,
                                        rows.holders if shared else (), rows.split if shared else (), piece=True))

    def finish(self) -> None:
        self.tensor_parallel.whole_to_rows(self.weights, [part.weight.view(-1, part.n) for part in self.moved])


def stepped_block(layout: FlatLayout, weight: str, name: str) -> tuple[int, ...]:
    """The matrix block ``name`` of fused weight ``weight`` is stepped as on bound partition
    ``layout``: in ``tensor_parallel="global"`` mode its whole logical matrix
    (``layout.whole_rows``), else the block of this shard's rows."""
    whole = layout.whole_rows
    if whole is not None and name in whole.rows:
        return tuple(whole.rows[name].shape)
    return layout.blocks[weight][name].rows, layout.row_length[weight]


def stepped_matrix(layout: FlatLayout, label: str) -> tuple[tuple[int, ...], bool]:
    """The matrix whose rows parameter or fused weight's block ``label`` (a block label of
    ``layout.blocks``) stands for on bound partition ``layout``, and whether its rows span the
    tensor-parallel ranks: a ``tensor_parallel="global"`` shard's or block's whole matrix
    (``layout.whole_rows``), a block of this shard's rows (``stepped_block``), or the parameter
    itself."""
    whole = layout.whole_rows
    if whole is not None and label in whole.rows:
        return tuple(whole.rows[label].shape), True
    for weight, blocks in layout.blocks.items():
        if label in blocks:
            return stepped_block(layout, weight, label), False
    return tuple(layout.holders[label][0].shape), False


class FusedBlockRows:
    """The rows ZeRO pieces own of fused weights (``labels``, their gradients valid), stepped as
    their logical blocks (``layout.blocks``), as at ZeRO stage 0 (``placements.megatron``): of
    a ``tensor_parallel="local"`` group (or a fused weight not split between TP ranks) each
    block of the shard is a matrix of its own (``local``), split by rows over the data-parallel
    ranks owning rows of it; of a ``"global"`` group each block is part of the whole logical
    matrix (``wide``: ``layout.whole_rows`` by block label), split over every (TP, DP) rank
    owning rows of it.  A piece owns one range of each block's rows (``fused.Block.within``):
    a view of the piece's rows where they are one range, else a copy written back at
    ``finish``; blocks the group keeps dense take AdamW there, as separate parameters would.
    The rows are the piece's whole owned rows (``OwnedRows``, after the cut-row exchange)."""

    def __init__(self, method: Method, group: dict, owned: "OwnedRows", layout: FlatLayout, labels: list[str]) -> None:
        self.local, self.wide, self.step = [], [], BlockStep()
        whole = layout.whole_rows
        parts = {part.q.label: part for part in owned.parts if part.matrix is not None}
        for label in labels:
            if label not in parts:
                continue
            rows = parts[label].matrix
            check_block_state(label, rows.state)
            wide = whole is not None and label in whole.shapes
            for name, block in layout.blocks[label].items():
                at, spans = block.within(rows.first_row, rows.weight.shape[0])
                if not spans:
                    continue
                weight, grad = self.step.rows(rows.weight, rows.grad, spans)
                st = rows.state.setdefault(block.name, {})
                shape = stepped_block(layout, label, name)
                if wide:
                    r = whole.rows[name]
                    first, holders, split = r.first, r.holders, r.split
                    if len(holders) == 1:
                        holders, split = (), ()
                else:
                    first, split = at, layout.splits.get(name, ())
                    holders = layout.owners[name] if split else ()
                if not method.rules.is_compressed_shape(group, shape):
                    check_dense_state(name, st)
                    self.step.add_dense(weight, grad, st)
                    continue
                m = Matrix(name, weight, grad, st, shape, first, holders, split, piece=True)
                method.check_state(group, m)
                (self.wide if wide else self.local).append(m)

    def finish(self, group: dict) -> None:
        """AdamW on the dense blocks, and the copies back into the pieces' rows."""
        self.step.finish(group)


class OwnedRows:
    """The rows pieces own (``arrays(q)``: the flat weight and gradient holding piece ``q``), as
    ``Matrix`` objects, with the two cut-row exchanges of the parameters ``split`` between
    ranks: the other holders' parts of a cut row to its owner when built, the owner's update of
    them back at ``finish``.  Shared by ZeRO partitions and FSDP2's top-k blocks."""

    def __init__(self, pieces: list[Piece], arrays, piece_state, layout: FlatLayout, split: list[str],
                 like: torch.Tensor) -> None:
        self.exchange = CutRowExchange(layout, split, like)
        self.parts = [_PieceRows(q, *arrays(q), piece_state, layout, self.exchange) for q in pieces]
        self.matrices = [part.matrix for part in self.parts if part.matrix is not None]
        self.exchange.exchange()                    # cut-row gradients: other holders -> owner
        for part in self.parts:
            part.gather()
        if self.exchange.buffer is not None:
            self.exchange.buffer.zero_()

    def finish(self, lr: float, weight_decay: float) -> None:
        for part in self.parts:
            part.scatter()
        self.exchange.exchange()                    # cut-row updates: owner -> other holders
        for part in self.parts:
            part.apply(lr, weight_decay)


class _PieceRows:
    """The ``Matrix`` of the rows a piece owns (``None`` if it owns none) and its part of the
    cut-row exchanges.

    The rows are ``(count, n)`` for a matrix, the 1-D span of the flattening otherwise.  The
    optimizer's update must be ``W ← (1 - lr·λ)·W + Δ`` with ``Δ`` independent of ``W``: the
    parts of the last row held elsewhere are worked on as zeros, so what comes out there is
    ``Δ``, which their holders apply to their own weights.
    """

    def __init__(self, q: Piece, flat: torch.Tensor, grad: torch.Tensor, piece_state, layout: FlatLayout,
                 exchange: CutRowExchange) -> None:
        self.q, self.flat, self.exchange = q, flat, exchange
        n = self.n = layout.row_length[q.label]
        rows = self.owned = owned_rows(q, n)
        self.matrix = None
        if rows.lead:
            at = q.start % n
            exchange.slot(q.label, q.start // n)[at:at + rows.lead] = grad[q.offset:q.offset + rows.lead]
        if not rows.count:
            # no state, but its range: a checkpoint's pieces must cover every element (a vector
            # cut by ZeRO-3 into a piece owning its one row and pieces owning none)
            piece_state(q)
            return
        begin = self.begin = q.offset + rows.lead   # where the owned rows start in the flat tensor
        span = rows.end - rows.begin
        held = self.held = q.stop - rows.begin      # how much of them is held here
        self.last = rows.first + rows.count - 1
        self.tail = held - (self.last - rows.first) * n     # elements of the last row held here
        self.partial = held < span
        if not self.partial:
            weight, g = flat[begin:begin + span], grad[begin:begin + span]
        else:
            # the last owned row is partly held elsewhere: work on a copy of the owned rows
            weight, g = flat.new_zeros(span), grad.new_zeros(span)
            weight[:held] = flat[begin:begin + held]
            g[:held] = grad[begin:begin + held]
        self.weight, self.grad = weight, g
        two_d = len(q.shape) == 2 and n == q.shape[1]
        split = layout.splits.get(q.label, ())
        self.matrix = Matrix(q.label, weight.view(rows.count, n) if two_d else weight,
                             g.view(rows.count, n) if two_d else g, piece_state(q), q.shape, rows.first,
                             layout.owners[q.label] if split else (), split, piece=True)

    def gather(self) -> None:
        """The other holders' parts of the last owned row, from the exchanged buffer."""
        if self.matrix is not None and self.partial:
            self.grad[self.held:] = self.exchange.slot(self.q.label, self.last)[self.tail:]

    def scatter(self) -> None:
        """The updated rows into the flat tensor; the update of the parts held elsewhere into
        the buffer, for their holders."""
        if self.matrix is not None and self.partial:
            self.flat[self.begin:self.begin + self.held] = self.weight[:self.held]
            self.exchange.slot(self.q.label, self.last)[self.tail:] = self.weight[self.held:]

    def apply(self, lr: float, weight_decay: float) -> None:
        """The owner's update of the cut row this piece starts inside, applied to its part."""
        lead = self.owned.lead
        if lead:
            q, at = self.q, self.q.start % self.n
            part = self.flat[q.offset:q.offset + lead]
            part.mul_(1 - lr * weight_decay).add_(self.exchange.slot(q.label, q.start // self.n)[at:at + lead])
