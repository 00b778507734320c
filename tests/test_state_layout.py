"""``optim.state_layout``: the one reader of how an optimizer's state is laid out.

The distributed checks (a real ZeRO rank's and FSDP2 rank's state walked against ``state_bytes``,
one process and the memory estimate) are in test_zero.py and test_fsdp2.py; here, in one
process, a partition's pieces as ranks save them, read back by checkpoint consolidation, and
``load_state_dict`` of partitioned state.
"""

import pytest
import torch

from ds_lowrank.checkpoint.pieces import merge
from ds_lowrank.optim.placements.zero import cut_for_piece
from ds_lowrank.checkpoint.universal import _pieces
from ds_lowrank.distributed.zero_layout import Piece
from ds_lowrank.optim import state_layout
from helpers import make_adapprox, make_galore, make_ldadam, make_microadam, roundtrip
from test_checkpoint import trained


def _ranks_state_dicts(opt, model, world: int) -> list[dict]:
    """What ``world`` ZeRO-1/2 ranks would save of ``opt``'s state: the model's parameters
    flattened in order, cut in ``world`` equal parts, each rank's pieces cut from the whole
    state with their metadata, keyed by label under the one flat tensor (index 0)."""
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    per = -(-total // world)
    group = opt.param_groups[0]
    hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    out = []
    for rank in range(world):
        lo, hi = rank * per, min((rank + 1) * per, total)
        pieces, at = {}, 0
        for name, p in params:
            start, stop = max(lo - at, 0), min(hi - at, p.numel())
            if start < stop:
                q = Piece(name, tuple(p.shape), start, stop, 0, rank)
                pieces[name] = {**state_layout.piece_metadata(q),
                                **cut_for_piece(type(opt), group, q, opt.state[p], torch.device("cpu"))}
            at += p.numel()
        out.append({"state": {0: pieces}, "param_groups": [{**hyper, "params": [0]}]})
    return out


@pytest.mark.parametrize("make", [make_ldadam, make_galore, make_adapprox, make_microadam],
                         ids=["ldadam", "galore", "adapprox", "microadam"])
def test_consolidation_reads_the_pieces_the_layout_describes(make):
    """Three ranks' saved pieces, found by consolidation through ``state_layout`` (their label,
    group and shape from their metadata), merge back to the state one process holds; and what
    the layout walks of them adds up, per parameter and key (counters aside), to the whole."""
    model, opt = trained(make)
    group = opt.param_groups[0]
    saved = _ranks_state_dicts(opt, model, 3)
    pieces, group_of, shapes = _pieces(saved)
    named = dict(model.named_parameters())
    assert sorted(pieces) == sorted(named) and set(group_of.values()) == {0}
    summed: dict = {}
    for sd in saved:
        for label, key, t in state_layout.tensors(sd["state"][0]):
            if opt.state_categories.get(key, "counters") != "counters":
                summed[(label, key)] = summed.get((label, key), 0) + t.numel() * t.element_size()
    for name, p in named.items():
        assert shapes[name] == tuple(p.shape)
        whole = opt.state[p]
        rebuilt = merge(type(opt), group, name, shapes[name], pieces[name])
        assert sorted(rebuilt) == sorted(whole), name
        for key, v in whole.items():
            assert rebuilt[key].dtype == v.dtype and torch.equal(rebuilt[key], v), (name, key)
            if opt.state_categories.get(key, "counters") != "counters":
                assert summed[(name, key)] == v.numel() * v.element_size(), (name, key)


def test_load_state_dict_keeps_every_dtype_of_partitioned_state():
    """torch's ``load_state_dict`` casts every state tensor, those of nested pieces included, to
    the parameter's dtype: a bf16 partition would round its pieces' float32 moments and turn
    their int64 ranges into bf16.  Each tensor comes back with its saved dtype."""
    model, opt = trained(make_ldadam, ef_dtype="int8", ef_bucket_size=6)
    flat = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.bfloat16, requires_grad=True)
    src = make_ldadam([flat])
    saved = _ranks_state_dicts(opt, model, 2)[1]
    src.state[flat] = saved["state"][0]
    dst = make_ldadam([torch.zeros_like(flat, requires_grad=True)])
    dst.load_state_dict(roundtrip(src.state_dict()))
    loaded = next(iter(dst.state.values()))
    expected = {(h.label, k): v for h in state_layout.held(saved["state"][0]) for k, v in h.state.items()}
    got = {(h.label, k): v for h in state_layout.held(loaded) for k, v in h.state.items()}
    assert sorted(got) == sorted(expected)
    dtypes = {v.dtype for v in expected.values()}
    assert {torch.int64, torch.float32, torch.uint8} <= dtypes     # ranges, moments, codes
    for lk, v in expected.items():
        assert got[lk].dtype == v.dtype and torch.equal(got[lk], v), lk
    assert [state_layout.piece_range(h.state) for h in state_layout.held(loaded)] == \
        [state_layout.piece_range(h.state) for h in state_layout.held(saved["state"][0])]


def test_the_walk_names_each_placement():
    """Whole state, a fused weight's blocks and a partition's pieces, each under its label, and
    no piece metadata among the optimizer's tensors."""
    t = torch.zeros(3, 2)
    whole = list(state_layout.held({"step": torch.tensor(1.0), "exp_avg": t}, "w"))
    assert [(h.label, h.placement) for h in whole] == [("w", state_layout.WHOLE)]
    blocks = list(state_layout.held({"gate": {"basis": t}, "up": {"basis": t}}, "fc1"))
    assert [(h.label, h.placement, h.name) for h in blocks] == [
        ("fc1[gate]", state_layout.BLOCK, "gate"), ("fc1[up]", state_layout.BLOCK, "up")]
    q = Piece("layer.weight", (4, 6), 5, 17, 0, 1)
    pieces = list(state_layout.held({"layer.weight": {**state_layout.piece_metadata(q), "error": t}}))
    assert [(h.label, h.placement, h.range, h.shape) for h in pieces] == [
        ("layer.weight", state_layout.PIECE, (5, 17), (4, 6))]
    assert [(lb, k) for lb, k, _ in state_layout.tensors({"layer.weight": pieces[0].state})] == [
        ("layer.weight", "error")]
