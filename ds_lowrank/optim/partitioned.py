"""One optimizer step on a ZeRO flat partition.

What the optimizer receives under ZeRO is a flat fp32 tensor; ``zero_layout`` says which
elements of which parameter it holds.  Here those pieces become what the algorithms work on:

- dense parameters (norms, embeddings...) are elementwise: AdamW on the slices;
- a matrix held whole by this rank is exactly the single-process case, on views of the flat
  tensor, with no communication;
- a matrix split between ranks is cut at arbitrary elements: a partial row, whole rows, a partial
  row.  Each row belongs to the rank holding its first element.  Before the step the other holders
  send their parts of such *cut rows* to the owner; each rank then works on whole rows
  (``Matrix.first_row``…), with a reducer summing over the matrix's holders; after the step the
  owner sends back the update for the parts it does not hold.  Both exchanges are one all-reduce
  over a buffer with a slot per cut row, issued only when cut rows exist.

Every rank walks the same lists in the same order, so collectives line up.
"""

from __future__ import annotations

import math

import torch

from ..distributed.comm import SplitMatrixReducer, all_reduce
from ..distributed.reducer import LOCAL
from ..distributed.zero_layout import (FlatLayout, LayoutError, Piece, check_layout, gather_holders,
                                       make_subgroups, subgroup, zero3_pieces, zero12_pieces)
from .matrix import Matrix
from .dense_adamw import adamw_step


def is_partition(group_originals: list, flat: torch.Tensor) -> bool:
    """Whether ``flat`` is a ZeRO flat partition standing for the group's original parameters."""
    if flat.dim() != 1 or any(flat is p for _, p in group_originals):
        return False
    return hasattr(flat, "ds_id") or any(hasattr(p, "_hp_mapping") for _, p in group_originals)


def bind(originals: list[tuple[str, torch.Tensor]], flat: torch.Tensor, is_lowrank) -> FlatLayout:
    """Build and check the layout of ``flat`` (collective: every rank binds the same group together)."""
    import torch.distributed as dist

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
    make_subgroups(layout, sorted(lb for lb, qs in layout.holders.items() if is_lowrank(qs[0].shape)))
    return layout


def lowrank_labels(opt, group: dict, layout: FlatLayout) -> set[str]:
    return {lb for lb, qs in layout.holders.items() if opt.is_lowrank_shape(group, qs[0].shape)}


# -- rows ------------------------------------------------------------------------------------


def owned_rows(q: Piece) -> tuple[int, int, int, int]:
    """``(first_row, rows, lead, tail)`` of a piece of an ``m × n`` matrix.

    ``rows`` counts the rows it owns (it holds their first element); ``lead`` is the number of
    elements at its start that belong to a row owned by another rank; ``tail`` is the number of
    elements it holds of its last owned row when that row is cut (0 if it holds it whole).
    """
    n = q.shape[1]
    first = -(-q.start // n)
    rows = max(0, -(-q.stop // n) - first)
    lead = min(first * n, q.stop) - q.start
    whole = max(0, q.stop // n - first)
    tail = q.stop - (first + whole) * n if rows > whole else 0
    return first, rows, lead, tail


def cut_rows(holders: list[Piece]) -> list[int]:
    """Rows of a matrix split between two or more ranks."""
    n = holders[0].shape[1]
    return sorted({q.start // n for q in holders[1:] if q.start % n})


class CutRowExchange:
    """A buffer with one ``n``-slot per cut row of the split matrices, summed over all ranks."""

    def __init__(self, layout: FlatLayout, labels: list[str], like: torch.Tensor) -> None:
        self.slots: dict[tuple[str, int], tuple[int, int]] = {}
        size = 0
        for label in labels:
            n = layout.holders[label][0].shape[1]
            for row in cut_rows(layout.holders[label]):
                self.slots[(label, row)] = (size, n)
                size += n
        self.buffer = like.new_zeros(size) if size else None
        self.group = layout.group

    def slot(self, label: str, row: int) -> torch.Tensor:
        start, n = self.slots[(label, row)]
        return self.buffer[start:start + n]

    def exchange(self) -> None:
        if self.buffer is not None:
            all_reduce(self.buffer, self.group, purpose="exchange")


# -- the step --------------------------------------------------------------------------------


def _valid(layout: FlatLayout, flat_grad: torch.Tensor, labels: list[str]) -> dict[str, bool]:
    """Per parameter: gradient finite and not all zero, agreed by all holders (one all-reduce
    when parameters are split between ranks)."""
    amax = {q.label: flat_grad[q.offset:q.offset + q.numel].abs().amax() if q.numel else
            flat_grad.new_zeros(()) for q in layout.pieces}
    shared = [lb for lb in labels if layout.is_shared(lb)]
    flags = {}
    if shared:
        # per parameter: [any holder saw a non-finite value, any holder saw a nonzero value]
        vec = flat_grad.new_zeros(2 * len(shared), dtype=torch.float32)
        for i, lb in enumerate(shared):
            if lb in amax:
                vec[2 * i] = (~torch.isfinite(amax[lb])).float()
                vec[2 * i + 1] = (amax[lb] > 0).float()
        import torch.distributed as dist
        all_reduce(vec, layout.group, op=dist.ReduceOp.MAX, purpose="valid")
        vals = vec.tolist()
        for i, lb in enumerate(shared):
            flags[lb] = vals[2 * i] == 0 and vals[2 * i + 1] > 0
    local = [lb for lb in amax if lb not in flags]
    if local:
        vals = torch.stack([amax[lb].float() for lb in local]).tolist()
        for lb, v in zip(local, vals):
            flags[lb] = math.isfinite(v) and v > 0
    return flags


def _piece_state(states: dict, q: Piece) -> dict:
    """The state of one piece, with the metadata that makes a saved partition self-describing."""
    st = states.setdefault(q.label, {})
    if "range" not in st:
        st["range"] = torch.tensor([q.start, q.stop], dtype=torch.int64)
        st["shape"] = torch.tensor(q.shape, dtype=torch.int64)
    return st


def step_partition(opt, group: dict, flat: torch.Tensor, layout: FlatLayout) -> int:
    """One step of ``opt`` on the flat partition ``flat``; returns the number of skipped parameters."""
    grad = flat.grad
    states = opt.state[flat]
    lowrank = lowrank_labels(opt, group, layout)
    labels = sorted(layout.holders)
    valid = _valid(layout, grad, labels)
    mine = [q for q in layout.pieces if q.numel]
    skipped = sum(1 for q in mine if not valid[q.label])

    dense = [q for q in mine if q.label not in lowrank and valid[q.label]]
    if dense:
        views = [flat[q.offset:q.offset + q.numel] for q in dense]
        for v, q in zip(views, dense):
            v.grad = grad[q.offset:q.offset + q.numel]
        adamw_step(views, [_piece_state(states, q) for q in dense], group)
        for v in views:
            v.grad = None

    split = [lb for lb in labels if lb in lowrank and valid.get(lb) and layout.is_shared(lb)]
    exchange = CutRowExchange(layout, split, flat)
    matrices, finish = [], []
    for q in mine:
        if q.label not in lowrank or not valid[q.label]:
            continue
        m, done = _matrix_of_piece(q, flat, grad, _piece_state(states, q), layout, exchange)
        matrices.append(m)
        finish.append(done)
    exchange.exchange()                         # cut-row gradients: other holders -> owner
    for done in finish:
        done("gather")

    def make_reducer(bucket, right):
        if not bucket[0].holders:
            return LOCAL
        rows = [(m.first_row, m.weight.shape[0], m.shape[0]) for m in bucket]
        return SplitMatrixReducer(subgroup(layout, bucket[0].holders), not right, rows)

    if exchange.buffer is not None:
        exchange.buffer.zero_()
    opt._matrix_step(group, matrices, make_reducer)
    for done in finish:
        done("scatter")
    exchange.exchange()                         # cut-row updates: owner -> other holders
    lr, wd = group["lr"], group["weight_decay"]
    for done in finish:
        done("apply", lr, wd)
    return skipped


def _matrix_of_piece(q: Piece, flat, grad, st, layout: FlatLayout, exchange: CutRowExchange):
    """The ``Matrix`` (owned rows) of a piece, and a callback for the cut-row exchanges."""
    n = q.shape[1]
    first, rows, lead, tail = owned_rows(q)
    begin = q.offset + lead                     # first element of the first owned row
    holders = tuple(p.rank for p in layout.holders[q.label]) if layout.is_shared(q.label) else ()
    if tail == 0:
        weight = flat[begin:begin + rows * n].view(rows, n)
        g = grad[begin:begin + rows * n].view(rows, n)
    else:
        # the last owned row is partly held elsewhere: work on a copy of the owned rows
        weight = flat.new_zeros(rows, n)
        g = grad.new_zeros(rows, n)
        held = (rows - 1) * n + tail
        weight.view(-1)[:held] = flat[begin:begin + held]
        g.view(-1)[:held] = grad[begin:begin + held]
    if lead:
        exchange.slot(q.label, q.start // n)[q.start % n:q.start % n + lead] = grad[q.offset:q.offset + lead]

    def done(stage, lr=None, wd=None):
        if stage == "gather" and tail:
            row = exchange.slot(q.label, first + rows - 1)
            g[-1, tail:] = row[tail:]
        elif stage == "scatter" and tail:
            held = (rows - 1) * n + tail
            flat[begin:begin + held] = weight.view(-1)[:held]
            # the update of the parts held elsewhere (their weights were zero here)
            exchange.slot(q.label, first + rows - 1)[tail:] = weight[-1, tail:]
        elif stage == "apply" and lead:
            part = flat[q.offset:q.offset + lead]
            part.mul_(1 - lr * wd).add_(exchange.slot(q.label, q.start // n)[q.start % n:q.start % n + lead])

    return Matrix(q.label, weight, g, st, q.shape, first, holders), done
