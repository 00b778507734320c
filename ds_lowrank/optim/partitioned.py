"""One optimizer step on a ZeRO flat partition.

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

Every rank walks the same lists in the same order, so collectives line up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..distributed.comm import all_reduce
from ..linalg import gradient_flags
from ..distributed.phases import SplitRunner
from ..distributed.zero_layout import (FlatLayout, Piece, check_layout, gather_holders, gloo_mirror,
                                       make_subgroups, subgroup, zero3_pieces, zero12_pieces)
from .matrix import Matrix
from .dense_adamw import adamw_step
from .state_layout import is_piece, piece_metadata


def is_partition(group_originals: list, flat: torch.Tensor) -> bool:
    """Whether ``flat`` is a ZeRO flat partition standing for the group's original parameters."""
    if flat.dim() != 1 or any(flat is p for _, p in group_originals):
        return False
    return hasattr(flat, "ds_id") or any(hasattr(p, "_hp_mapping") for _, p in group_originals)


def bind(originals: list[tuple[str, torch.Tensor]], flat: torch.Tensor, row_length) -> FlatLayout:
    """Build and check the layout of ``flat`` (collective: every rank binds the same group together).

    ``row_length(shape)`` is the optimizer's row length for a parameter of that shape, or
    ``None`` for one it updates with AdamW.
    """
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
    if flat.device.type == "cpu" and dist.get_backend(group) != "gloo":
        # offloaded partitions: the step's tensors are on the CPU, which NCCL cannot carry
        layout.group, layout.backend = gloo_mirror(group), "gloo"
    for label, qs in layout.holders.items():
        n = row_length(qs[0].shape)
        if n is not None:
            rows = [(q.rank, owned_rows(q, n)) for q in qs]
            layout.row_length[label] = n
            layout.owners[label] = tuple(rank for rank, r in rows if r.count)
            if len(layout.owners[label]) > 1:
                layout.splits[label] = tuple((rank, r.first, r.count) for rank, r in rows)
    make_subgroups(layout, set(layout.owners.values()))
    return layout


# -- rows ------------------------------------------------------------------------------------


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
    numel = math.prod(q.shape)
    first = -(-q.start // n)
    count = max(0, -(-q.stop // n) - first)
    lead = min(first * n, q.stop) - q.start
    return Rows(first, count, lead, first * n, min((first + count) * n, numel))


def cut_rows(holders: list[Piece], n: int) -> list[int]:
    """Rows of a parameter split between two or more ranks."""
    return sorted({q.start // n for q in holders[1:] if q.start % n})


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


# -- the step --------------------------------------------------------------------------------


def _valid(layout: FlatLayout, flat_grad: torch.Tensor, labels: list[str], limit) -> dict[str, bool]:
    """Per parameter: gradient not all zero and no entry above ``limit(label)`` (so finite:
    ``LowRankOptimizer.gradient_limit``), agreed by all holders (one all-reduce when parameters
    are split between ranks)."""
    held = [q for q in layout.pieces if q.numel]
    over, nonzero = gradient_flags([flat_grad[q.offset:q.offset + q.numel] for q in held],
                                   [limit(q.label) for q in held])
    seen = {q.label: (o, nz) for q, o, nz in zip(held, over, nonzero)}
    for q in layout.pieces:
        seen.setdefault(q.label, (False, False))
    shared = [lb for lb in labels if layout.is_shared(lb)]
    flags = {}
    if shared:
        # per parameter: [any holder saw a value past the limit or not finite, any holder saw a
        # nonzero value]
        vec = flat_grad.new_zeros(2 * len(shared), dtype=torch.float32)
        for i, lb in enumerate(shared):
            if lb in seen:
                vec[2 * i], vec[2 * i + 1] = float(seen[lb][0]), float(seen[lb][1])
        import torch.distributed as dist
        all_reduce(vec, layout.group, op=dist.ReduceOp.MAX, purpose="valid")
        vals = vec.tolist()
        for i, lb in enumerate(shared):
            flags[lb] = vals[2 * i] == 0 and vals[2 * i + 1] > 0
    for lb, (o, nz) in seen.items():
        if lb not in flags:
            flags[lb] = nz and not o
    return flags


def _piece_state(opt, group: dict, states: dict, q: Piece, device: torch.device) -> dict:
    """The state of one piece, with the metadata that makes a saved partition self-describing;
    cut from a whole state given to ``load_whole_state`` when there is one."""
    st = states.setdefault(q.label, {})
    if not is_piece(st):
        st.update(piece_metadata(q))
        whole = opt._whole_states.pop(q.label, None)
        if whole is not None:
            from ..checkpoint.pieces import cut
            st.update(cut(type(opt), group, q, whole, device))
    return st


def step_partition(opt, group: dict, flat: torch.Tensor, layout: FlatLayout) -> int:
    """One step of ``opt`` on the flat partition ``flat``; returns the number of skipped parameters."""
    grad = flat.grad
    states = opt.state[flat]
    _restore_weights(opt, flat, layout)
    labels = sorted(layout.holders)
    valid = _valid(layout, grad, labels, lambda lb: opt.gradient_limit(
        group, tuple(layout.holders[lb][0].shape), flat.dtype))
    mine = [q for q in layout.pieces if q.numel]
    skipped = sum(1 for q in mine if not valid[q.label])

    def piece_state(q: Piece) -> dict:
        return _piece_state(opt, group, states, q, flat.device)

    split = [lb for lb in labels if lb in layout.row_length and valid.get(lb) and layout.is_shared(lb)]
    rows = [q for q in mine if q.label in layout.row_length and valid[q.label]]
    step_owned_rows(opt, group, rows, lambda q: (flat, grad), piece_state, layout, split, flat,
                    SplitRunner(lambda holders: subgroup(layout, holders)))
    # after the rows, whose checks (in ``_matrix_step``) may still refuse the step
    dense = [q for q in mine if q.label not in layout.row_length and valid[q.label]]
    if dense:
        views = [flat[q.offset:q.offset + q.numel] for q in dense]
        for v, q in zip(views, dense):
            v.grad = grad[q.offset:q.offset + q.numel]
        adamw_step(views, [piece_state(q) for q in dense], group)
        for v in views:
            v.grad = None
    return skipped


def step_owned_rows(opt, group: dict, pieces: list[Piece], arrays, piece_state, layout: FlatLayout,
                    split: list[str], like: torch.Tensor, runner) -> None:
    """The optimizer's step on the rows ``pieces`` own (``arrays(q)``: the flat weight and gradient
    holding piece ``q``), with the two cut-row exchanges of the parameters ``split`` between
    ranks: the other holders' parts of a cut row to its owner before the step, the owner's update
    of them back after."""
    exchange = CutRowExchange(layout, split, like)
    matrices, finish = [], []
    for q in pieces:
        flat, grad = arrays(q)
        m, done = _rows_of_piece(q, flat, grad, piece_state, layout, exchange)
        if m is not None:
            matrices.append(m)
        finish.append(done)
    exchange.exchange()                         # cut-row gradients: other holders -> owner
    for done in finish:
        done("gather")
    if exchange.buffer is not None:
        exchange.buffer.zero_()
    opt._matrix_step(group, matrices, runner)
    for done in finish:
        done("scatter")
    exchange.exchange()                         # cut-row updates: owner -> other holders
    for done in finish:
        done("apply", group["lr"], group["weight_decay"])


def _restore_weights(opt, flat: torch.Tensor, layout: FlatLayout) -> None:
    """Copy fp32 weights given to ``load_whole_state`` into the pieces of ``flat``, once."""
    for q in layout.pieces:
        w = opt._whole_weights.pop(q.label, None)
        if w is not None and q.numel:
            flat.detach()[q.offset:q.offset + q.numel] = w.reshape(-1)[q.start:q.stop].to(flat)


def _rows_of_piece(q: Piece, flat, grad, piece_state, layout: FlatLayout, exchange: CutRowExchange):
    """The ``Matrix`` of the rows a piece owns (``None`` if it owns none) and a callback for the
    cut-row exchanges.

    The rows are ``(count, n)`` for a matrix, the 1-D span of the flattening otherwise.  The
    optimizer's update must be ``W ← (1 - lr·λ)·W + Δ`` with ``Δ`` independent of ``W``: the
    parts of the last row held elsewhere are worked on as zeros, so what comes out there is
    ``Δ``, which their holders apply to their own weights.
    """
    n = layout.row_length[q.label]
    rows = owned_rows(q, n)
    if rows.lead:
        at = q.start % n
        exchange.slot(q.label, q.start // n)[at:at + rows.lead] = grad[q.offset:q.offset + rows.lead]

    def apply_lead(stage, lr=None, wd=None):
        if stage == "apply" and rows.lead:
            at = q.start % n
            part = flat[q.offset:q.offset + rows.lead]
            part.mul_(1 - lr * wd).add_(exchange.slot(q.label, q.start // n)[at:at + rows.lead])

    if not rows.count:
        # no state, but its range: a checkpoint's pieces must cover every element (a vector
        # cut by ZeRO-3 into a piece owning its one row and pieces owning none)
        piece_state(q)
        return None, apply_lead
    begin = q.offset + rows.lead                # where the owned rows start in the flat tensor
    span = rows.end - rows.begin
    held = q.stop - rows.begin                  # how much of them is held here
    last = rows.first + rows.count - 1
    tail = held - (last - rows.first) * n       # elements of the last row held here
    if held >= span:
        weight, g = flat[begin:begin + span], grad[begin:begin + span]
    else:
        # the last owned row is partly held elsewhere: work on a copy of the owned rows
        weight, g = flat.new_zeros(span), grad.new_zeros(span)
        weight[:held] = flat[begin:begin + held]
        g[:held] = grad[begin:begin + held]
    two_d = len(q.shape) == 2 and n == q.shape[1]
    split = layout.splits.get(q.label, ())
    m = Matrix(q.label, weight.view(rows.count, n) if two_d else weight,
               g.view(rows.count, n) if two_d else g, piece_state(q), q.shape, rows.first,
               layout.owners[q.label] if split else (), split, piece=True)

    def done(stage, lr=None, wd=None):
        if held >= span:
            apply_lead(stage, lr, wd)
        elif stage == "gather":
            g[held:] = exchange.slot(q.label, last)[tail:]
        elif stage == "scatter":
            flat[begin:begin + held] = weight[:held]
            exchange.slot(q.label, last)[tail:] = weight[held:]
        else:
            apply_lead(stage, lr, wd)

    return m, done
