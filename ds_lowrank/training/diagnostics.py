"""What a low-rank optimizer is doing, measured cheaply at logging steps.

:class:`LowRankProbe` reports, for the low-rank matrices of a ds_lowrank optimizer:

- ``ef_to_grad``: the error-feedback norm ``‖e‖`` after the step relative to the norm of the
  gradient that step received (over all low-rank matrices together; ``ef_to_grad_max`` is the
  worst single matrix).  Near 0 the subspace captures the gradient; a ratio that keeps growing
  means the rank is too small for what the error feedback has to carry.
- ``basis_drift``: how far each step moved the subspace, ``1 - ‖P_oldᵀ P_new‖²_F / r`` (the mean
  squared sine of the principal angles between the old and the new rank-``r`` subspaces): 0 when
  the subspace did not move, 1 when the new one is orthogonal to the old.  Mean over matrices,
  and ``basis_drift_max``.

Both are read from the optimizer's state around one ``step()``: the probe hooks the optimizer
(``register_step_pre_hook`` / ``register_step_post_hook``), does nothing unless :meth:`arm` was
called, and then copies the bases before the step (the previous basis is overwritten in place)
and measures after it.  So the copies exist only during armed steps.

The state may be a plain parameter's (``opt.state[p]``), a ZeRO partition's, nested by
parameter label (``opt.state[flat][label]``), or an FSDP2 parameter's DTensors (``optim.fsdp2``),
where each rank holds some rows of a matrix: norms are sums over rows, and ``P_oldᵀ P_new`` is a
sum over the rows of a left projection's basis, or over the columns of a right one's (of which
each rank owning rows of a split matrix keeps a block, unless FSDP2 keeps it whole on every
rank), so the ranks add their parts in one all-reduce over the world in :meth:`collect`.

On FSDP2 the matrix is the one the optimizer steps (``fsdp2.layout``): with torch's tensor
parallelism, the whole matrix in ``tensor_parallel="global"`` mode, each TP shard in ``"local"``
mode (a matrix of its own: its own ``ef_to_grad`` and ``basis_drift``).  Ranks that step the
same matrix alike (HSDP's replicas, every TP rank of a parameter tensor parallelism leaves
whole, on its ``dp`` mesh) are counted once: of the groups of ranks that report a matrix, only
the first (by its ranks) adds its parts.

On a ZeRO partition it is the matrix the partition's rows are stepped as
(``placements.zero.stepped_matrix``): a fused weight's blocks (SwiGLU's gate and up, a fused
QKV's q, k and v) are matrices of their own, of which each rank holds the rows its pieces own.
Under Megatron's tensor parallelism, where ZeRO partitions each TP rank's parameters over its
data-parallel group, that is each TP rank's shard (or block of one) in ``"local"`` mode and the
whole (logical) matrix over every TP and DP rank in ``"global"`` mode; a parameter tensor
parallelism leaves whole is counted once, as above.  What cannot be measured is left out with a
warning, once per matrix.

:func:`lowrank_optimizer` finds the ds_lowrank optimizer behind a DeepSpeed engine,
:func:`state_bytes_by_rank` gathers every rank's ``state_bytes()``, and
:func:`engine_state_bytes_by_rank` does the same for any engine, DeepSpeed's own AdamW included
(counted from the tensors of its state).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed import fused
from ..distributed import tensor_parallel as tp
from ..optim import fsdp2, state_layout
from ..optim.base import CATEGORIES, CompressedOptimizer
from ..optim.blocks import block_shape
from ..optim.ldadam import dense_error
from ..optim.placements.zero import stepped_matrix


def lowrank_optimizer(obj) -> CompressedOptimizer | None:
    """The ds_lowrank optimizer inside a DeepSpeed engine or optimizer wrapper, or ``None``
    (e.g. for DeepSpeed's own AdamW)."""
    seen = set()
    todo = [getattr(obj, "basic_optimizer", None), obj]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, CompressedOptimizer):
            return x
        # ZeRO and the bf16/fp16 wrappers keep the optimizer they drive in ``.optimizer``.
        todo.append(getattr(x, "optimizer", None))
    return None


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def state_bytes_by_rank(opt: CompressedOptimizer, group=None) -> dict[str, list[int]]:
    """Every rank's ``opt.state_bytes()``, by category: ``{"total": [rank 0, rank 1, ...], ...}``.

    Collective over ``group`` (default: the world) when torch.distributed is initialized.
    """
    mine = opt.state_bytes()
    keys = sorted(mine)
    local = torch.tensor([mine[k] for k in keys], dtype=torch.int64)
    if not _distributed(group):
        return {k: [int(v)] for k, v in zip(keys, local.tolist())}
    # all_gather_object rather than a tensor collective: NCCL would need the tensor on the GPU.
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, local.tolist(), group=group)
    return {k: [int(r[i]) for r in everyone] for i, k in enumerate(keys)}


def _innermost(obj):
    """The optimizer that holds the state: ZeRO and the bf16/fp16 wrappers keep the one they
    drive in ``.optimizer``."""
    while isinstance(getattr(obj, "optimizer", None), torch.optim.Optimizer) or \
            hasattr(getattr(obj, "optimizer", None), "state"):
        obj = obj.optimizer
    return obj


def tensor_state_bytes(opt) -> dict[str, int]:
    """The bytes of a torch optimizer's state tensors, in ``state_bytes()``'s categories: step
    counters in ``counters``, every other tensor (Adam's two moments) in ``dense_moments``."""
    out = dict.fromkeys(CATEGORIES, 0)
    for st in getattr(opt, "state", {}).values():
        for _, key, t in state_layout.tensors(st):
            out["counters" if key == "step" else "dense_moments"] += t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out


def engine_state_bytes_by_rank(engine, group=None) -> dict[str, list[int]]:
    """Every rank's optimizer-state bytes by category for a DeepSpeed engine: ``state_bytes()`` of
    a ds_lowrank optimizer, else the tensors in the state of DeepSpeed's own (e.g. AdamW's moments
    of this rank's ZeRO partition).  Collective, as :func:`state_bytes_by_rank`."""
    lowrank = lowrank_optimizer(engine)
    if lowrank is not None:
        return state_bytes_by_rank(lowrank, group)
    mine = tensor_state_bytes(_innermost(engine.optimizer if hasattr(engine, "optimizer") else engine))
    keys = sorted(mine)
    if not _distributed(group):
        return {k: [int(mine[k])] for k in keys}
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, [int(mine[k]) for k in keys], group=group)
    return {k: [int(r[i]) for r in everyone] for i, k in enumerate(keys)}


@dataclass
class _Held:
    """One low-rank matrix as this rank holds it, walking the optimizer's state."""

    key: str                        # unique in this process: the old bases are kept by it
    state: dict                     # its state tensors as held here
    grad: torch.Tensor | None       # the gradient of the elements held here; None if unknown
    shape: tuple                    # the matrix the optimizer steps
    group: dict                     # its parameter group
    # whether the ``r × n`` state held here (a right projection's basis) is all of it, where the
    # placement says so (FSDP2), else ``None`` (it is where all rows are)
    whole: bool | None = None
    name: str | None = None         # its name across ranks, where not ``key``
    replica: tuple | None = None    # the ranks whose parts add up, where others hold a replica
    why: str | None = None          # why it cannot be measured, if so


def _held_rows(grad: torch.Tensor, held: tuple[int, int], n: int, block: fused.Block) -> torch.Tensor:
    """Of ``grad``, elements ``[start, stop)`` (``held``) of a fused weight's row-major flattening
    in rows of ``n``, those in the rows of ``block`` (``Block.within`` the rows they touch)."""
    start, stop = held
    first = start // n
    _, spans = block.within(first, -(-stop // n) - first)
    parts = [grad[max((first + a) * n, start) - start:min((first + b) * n, stop) - start] for a, b in spans]
    return torch.cat(parts) if parts else grad[:0]


@dataclass
class _Measured:
    """One matrix's contribution from this rank, measured after an armed step."""

    right: bool
    rank: int
    error_sq: torch.Tensor | None       # ‖e‖² of the rows held here
    grad_sq: torch.Tensor | None        # ‖g‖² of the elements held here; None if unknown
    overlap: torch.Tensor | None = None   # ‖P_oldᵀP_new‖²/r where the whole basis is here
    product: torch.Tensor | None = None   # P_oldᵀP_new of the rows held here (r × r) otherwise
    replica: tuple | None = None          # the ranks whose parts of the matrix add up (one replica)


class LowRankProbe:
    """Error-feedback and subspace diagnostics of a ds_lowrank optimizer at chosen steps.

    Usage: ``probe = LowRankProbe(opt)``; before a step to be measured, ``probe.arm()``; after
    it, ``metrics = probe.collect()`` on every rank (a collective when the state is partitioned).
    Steps that are not armed cost nothing beyond two hook calls.
    """

    def __init__(self, optimizer: CompressedOptimizer, group=None) -> None:
        self.opt = optimizer
        self.group = group
        self._armed = False
        self._old_bases: dict[str, torch.Tensor] = {}
        self._measured: dict[str, _Measured] = {}
        self._partitioned = False
        self._warned: set[tuple[str, str]] = set()
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]

    def arm(self) -> None:
        """Measure the next optimizer step (all of its ``step()`` calls, e.g. one per ZeRO group)."""
        self._armed = True
        self._old_bases.clear()
        self._measured.clear()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- walking the state -------------------------------------------------------------------

    def _matrices(self):
        """The :class:`_Held` low-rank matrices of the current parameter groups (DeepSpeed
        narrows them to the group it is stepping), their keys made unique in this process (one
        process may hold several parameters of one name, e.g. the TP shards of a weight)."""
        seen: dict[str, int] = {}
        for m in self._held_matrices():
            n = seen.get(m.key, 0)
            seen[m.key] = n + 1
            if n:
                m.key = f"{m.key}#{n}"
                m.name = None if m.name is None else f"{m.name}#{n}"
            yield m

    def _held_matrices(self):
        for gi, group in enumerate(self.opt.param_groups):
            # the Megatron shards of the group, by label (a ZeRO piece names its parameter)
            shards = {label for label, p in self.opt.originals(group, gi) if tp.is_shard(p)}
            for i, p in enumerate(group["params"]):
                st = self.opt.state.get(p)
                if not st:
                    continue
                label = self.opt.param_label(group, i, gi)
                piece = None
                for h in state_layout.held(st, label, p):
                    if h.placement == state_layout.PIECE:
                        # every rank holding a partition takes part in ``collect``'s sums,
                        # also one whose pieces own no rows of a matrix
                        self._partitioned = True
                        piece = h
                        yield from self._unowned(group, shards, p, h)
                    if "basis" not in h.state:
                        continue
                    if h.placement == state_layout.BLOCK:
                        # a fused weight's block: a matrix of its own, labelled as the optimizer does
                        b = next(b for b in fused.blocks(label, p) if b.name == h.name)
                        grad = None if p.grad is None else p.grad.index_select(0, b.index(p.device))
                        yield _Held(h.label, h.state, grad, self._block_shape(group, b, p), group)
                    elif h.placement in (state_layout.PIECE, state_layout.PIECE_BLOCK):
                        yield self._on_partition(group, shards, p, piece, h)
                    elif h.placement == state_layout.SHARDED:
                        # this rank's rows (and block of columns, or the whole of a replicated
                        # tensor) of the matrix the optimizer steps: with tensor parallelism
                        # the whole one (global mode) or this rank's TP shard (local mode)
                        self._partitioned = True
                        split = fsdp2.layout(label, p, group.get("tensor_parallel", "local"))
                        if split.tp is not None and split.tp.mode == "local":
                            label = f"{label}[tp {p.device_mesh.get_local_rank(1)}]"
                        grad = None if p.grad is None else state_layout.local(p.grad)
                        whole = fsdp2.column_block(self.opt, group, p, split) is None
                        # the ranks whose parts of this matrix add up (one replica of it)
                        replica = tuple(dist.get_process_group_ranks(split.group))
                        yield _Held(label, h.tensors(), grad, split.shape, group, whole, replica=replica)
                    else:
                        yield _Held(label, h.state, p.grad, tuple(p.shape), group)

    def _on_partition(self, group: dict, shards: set[str], flat: torch.Tensor, piece: state_layout.Held,
                      h: state_layout.Held) -> "_Held":
        """A parameter's rows (``PIECE``), or a fused weight's block's (``PIECE_BLOCK``), that
        ``piece`` of ZeRO partition ``flat`` holds, as the matrix the optimizer steps them as
        (``placements.zero.stepped_matrix``), with the gradient of the elements the piece holds
        of them (the ranks' squares add up to the whole gradient's).

        Which ranks' parts add up: a matrix is one over the ranks of the data-parallel group
        that partitions it; under Megatron's tensor parallelism ZeRO partitions each TP rank's
        parameters over its own such group, so a ``"local"`` shard (or a block of one) is a
        matrix per TP rank (named apart), a ``"global"`` one is rows of one whole matrix over
        every (TP, DP) rank, and a parameter TP leaves whole is stepped alike by every TP rank
        (a replica per data-parallel group, counted once).  ``shards``: the labels of the
        group's Megatron shards."""
        layout = self.opt.partition_layout(flat)
        label = piece.label
        m = _Held(h.label, h.state, None, piece.shape, group)
        if layout is None:
            if h.placement == state_layout.PIECE_BLOCK:
                m.why = ("its ZeRO partition has not been stepped since its state was loaded, so where "
                         "the block's rows lie in it is not known yet")
            return m
        span = state_layout.piece_span(layout, label)
        grad = flat.grad
        if h.placement == state_layout.PIECE_BLOCK:
            block = layout.blocks.get(label, {}).get(h.label)
            if block is None:
                m.why = "its ZeRO partition does not step this weight as its blocks"
                return m
            if grad is not None and span is not None:
                grad = _held_rows(grad[span[0]:span[0] + span[1]], piece.range, layout.row_length[label],
                                  block)
        elif grad is not None and span is not None:
            grad = grad[span[0]:span[0] + span[1]]
        m.grad = None if span is None else grad
        m.shape, wide = stepped_matrix(layout, h.label)
        if not _distributed(None) or wide:
            return m
        ranks = tuple(dist.get_process_group_ranks(layout.group))
        if label in shards:
            m.name = f"{h.label}[dp {ranks[0]}]"
        else:
            m.replica = ranks
        return m

    def _unowned(self, group: dict, shards: set[str], flat: torch.Tensor, piece: state_layout.Held):
        """The low-rank matrices (or fused weight's blocks) of which ``piece`` holds elements but
        owns no row, so keeps no state: part of a row cut between ranks, stepped by its owner.
        Their gradient there is part of the matrix's, measured here as the rest of it is where
        the owner's rows are."""
        layout = self.opt.partition_layout(flat)
        if layout is None or getattr(self.opt, "projects_right", None) is None:
            return
        label = piece.label
        if label in layout.blocks:
            stateless = [state_layout.Held(name, state_layout.PIECE_BLOCK, {}, block.name)
                         for name, block in layout.blocks[label].items()
                         if "basis" not in piece.state.get(block.name, {})]
        elif label in layout.row_length and "basis" not in piece.state:
            stateless = [state_layout.Held(label, state_layout.PIECE, {}, label)]
        else:
            return
        for h in stateless:
            m = self._on_partition(group, shards, flat, piece, h)
            if m.why is None and m.grad is not None and m.grad.numel() and \
                    self.opt.is_compressed_shape(group, m.shape):
                yield m

    def _block_shape(self, group: dict, b, p: torch.Tensor) -> tuple[int, int]:
        """The matrix a block is: of the whole model in global mode (its rows of it held here)."""
        return block_shape(b, p, self.opt.tensor_parallel_world(group, p))

    def _projects_right(self, group: dict, shape: tuple[int, ...]) -> bool | None:
        rule = getattr(self.opt, "projects_right", None)
        return None if rule is None else bool(rule(group, shape))

    # -- the hooks ---------------------------------------------------------------------------

    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self._armed:
            return
        for m in self._matrices():
            if "step" in m.state and bool(m.state["step"] > 0):
                # The step overwrites the basis in place (it is a view into a packed buffer).
                self._old_bases[m.key] = m.state["basis"].detach().clone()

    def _cannot_measure(self, m: _Held) -> None:
        """Say once per matrix and reason that ``m`` is left out of the diagnostics."""
        if (m.key, m.why) not in self._warned:
            self._warned.add((m.key, m.why))
            warnings.warn(f"LowRankProbe: {m.key} is not measured: {m.why}", RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._armed:
            return
        for held in self._matrices():
            old = self._old_bases.pop(held.key, None)
            if held.why is not None:
                self._cannot_measure(held)
                continue
            st, shape = held.state, held.shape
            right = self._projects_right(held.group, shape)
            basis = st.get("basis")         # none where this rank holds only part of a cut row
            r = int(held.group["rank"]) if "rank" in held.group else min(basis.shape) if basis is not None else 0
            error = st.get("error")
            # dequantized if compressed (LDAdam's int8/int4); a rank holding no rows of the
            # matrix has empty codes, which have nothing to dequantize
            error = torch.zeros(0) if error is not None and not error.numel() else dense_error(st)
            m = _Measured(right=bool(right), rank=r,
                          error_sq=None if error is None else _sq_norm(error),
                          grad_sq=None if held.grad is None else _sq_norm(held.grad), replica=held.replica)
            if old is not None and right is not None and basis is not None:
                # A left basis (rows × r) is whole only where all rows are; a right one (r × n)
                # only where all rows are too, as a ZeRO piece of a split matrix keeps a block
                # of its columns.  Otherwise P_oldᵀ·P_new is a sum over the ranks' parts.  A
                # rank that owns no row of the matrix (it holds part of a row owned elsewhere)
                # has nothing to add.
                rows = st["proj_exp_avg"].shape[0] if right else basis.shape[0]
                prod = old.double() @ basis.double().mT if right else old.double().mT @ basis.double()
                if rows == 0:
                    pass
                elif held.whole if (right and held.whole is not None) else rows == shape[0]:
                    m.overlap = prod.square().sum() / r
                else:
                    m.product = prod
            self._measured[held.name or held.key] = m

    def _state_device(self) -> torch.device:
        """Where the optimizer keeps its state: the all-reduce must run there (NCCL: the GPU),
        also on a rank that measured nothing."""
        for st in self.opt.state.values():
            for _, _, t in state_layout.tensors(st):
                # step counters and partition metadata stay on the CPU; moments do not
                if t.is_floating_point() and t.dim() > 0:
                    return t.device
        return torch.device("cpu")

    # -- the result --------------------------------------------------------------------------

    def collect(self) -> dict[str, float]:
        """The diagnostics of the armed step, combined over ranks; disarms the probe.

        Keys (each present only when measured): ``ef_norm``, ``lowrank_grad_norm``,
        ``ef_to_grad``, ``ef_to_grad_max``, ``basis_drift``, ``basis_drift_max``.  The first step
        has no previous basis, so no drift; ``{}`` when nothing was measured (no armed step, or
        a step the optimizer skipped).  Every rank must call it.
        """
        self._armed = False
        self._old_bases.clear()
        measured, self._measured = self._measured, {}
        table = {lb: (m.rank, m.product is not None, m.replica) for lb, m in measured.items()}
        # Partitioned state (ZeRO, or DeepSpeed's bf16 optimizer) is partitioned on every rank
        # alike, so this local test agrees everywhere; replicated state is complete on each
        # rank and needs no communication.
        group = self.group
        partitioned = self._partitioned and _distributed(group)
        if partitioned:
            # Agree on the matrices (a rank may hold none of some), on those whose r × r
            # products must be summed, and on the replica of each that adds its parts.
            everyone: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(everyone, table, group=group)
            table = {}
            for theirs in everyone:
                for lb, (r, split, replica) in theirs.items():
                    # (the rank from a holder of the basis: one holding part of a cut row has none)
                    r0, was_split, first = table.get(lb, (r, False, replica))
                    table[lb] = (max(r, r0), split or was_split,
                                 min((x for x in (first, replica) if x is not None), default=None))
        if not table:
            return {}
        spans, size = {}, 0
        for lb in sorted(table):
            r, split, _ = table[lb]
            spans[lb] = slice(size, size + 6 + (r * r if split else 0))
            size = spans[lb].stop
        buffer = torch.zeros(size, dtype=torch.float64, device=self._state_device())
        for lb, m in measured.items():
            if m.replica == table[lb][2]:
                _fill(buffer[spans[lb]], m)
        if partitioned:
            dist.all_reduce(buffer, group=group)
        host = buffer.cpu()
        return _summarize([(table[lb][0], host[span]) for lb, span in spans.items()])


def _fill(row: torch.Tensor, m: _Measured) -> None:
    """One matrix's slots: ``[‖e‖², has_e, ‖g‖², g_missing, overlap_sum, overlap_count]``, then
    for a matrix whose rows are split between ranks the ``r²`` entries of ``P_oldᵀ P_new``."""
    if m.error_sq is not None:
        row[0], row[1] = m.error_sq, 1
    if m.grad_sq is None:
        row[3] = 1
    else:
        row[2] = m.grad_sq
    if m.overlap is not None:
        row[4], row[5] = m.overlap, 1
    elif m.product is not None:
        row[5] = 1
        row[6:] = m.product.reshape(-1)


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dtype=torch.float64).square()


def _summarize(rows: list[tuple[int, torch.Tensor]]) -> dict[str, float]:
    """The metrics from each matrix's ``(rank, slots)`` summed over ranks."""
    err_sq = grad_sq = 0.0
    ratios, drifts = [], []
    have_error = have_grad = False
    for r, row in rows:
        e2, has_e, g2, g_missing, o_sum, o_count = row[:6].tolist()
        if has_e:
            have_error = True
            err_sq += e2
        if not g_missing:
            have_grad = True
            grad_sq += g2
            if has_e and g2 > 0:
                ratios.append(math.sqrt(e2 / g2))
        if o_count:
            # split rows: the summed product; whole bases: the holders' (equal) overlaps averaged
            overlap = float(row[6:].square().sum()) / r if row.numel() > 6 else o_sum / o_count
            drifts.append(min(1.0, max(0.0, 1.0 - overlap)))
    out: dict[str, float] = {}
    if have_error:
        out["ef_norm"] = math.sqrt(err_sq)
    if have_grad:
        out["lowrank_grad_norm"] = math.sqrt(grad_sq)
    if have_error and have_grad and grad_sq > 0:
        out["ef_to_grad"] = math.sqrt(err_sq / grad_sq)
    if ratios:
        out["ef_to_grad_max"] = max(ratios)
    if drifts:
        out["basis_drift"] = sum(drifts) / len(drifts)
        out["basis_drift_max"] = max(drifts)
    return out
