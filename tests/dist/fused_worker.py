"""Fused tensor-parallel weights against one process (launched by torchrun, TP = world size).

Usage: torchrun --nproc_per_node N tests/dist/fused_worker.py OUT.json

A SwiGLU ``linear_fc1`` (partition_stride 2: rank r holds [gate rows r; up rows r]) and a GQA fused
QKV (rank r holds its query groups, each [q heads; k head; v head]) are built from whole logical
matrices, with their gradients cut the same way.  ``"global"`` mode is compared with one process
stepping the logical matrices as separate parameters, ``"local"`` with stepping each block of
each shard as its own parameter.  Rank 0 writes what it measured to OUT.json.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import finish  # noqa: E402

from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam  # noqa: E402
from ds_lowrank.distributed import comm  # noqa: E402

HIDDEN, FFN = 10, 12                    # fc1: gate and up are FFN × HIDDEN
HEADS, GROUPS, HEAD_DIM = 12, 6, 2      # qkv: 6 query groups of 2 query heads: TP 1, 2, 3
STEPS = 5
OPTIMIZERS = {
    "ldadam": lambda groups: LDAdam(groups, lr=1e-2, weight_decay=0.01, rank=3),
    "galore": lambda groups: GaLoreAdamW(groups, lr=1e-2, rank=3, update_proj_gap=2),
    "adapprox": lambda groups: Adapprox(groups, lr=1e-2, weight_decay=0.01, rank_min=1, rank_init=2,
                                        rank_max=3, rank_interval=2),
    # at the default within_adamw, q (24 × 10) is compressed and the 12 × 10 blocks are not
    "ldadam_r4": lambda groups: LDAdam(groups, lr=1e-2, weight_decay=0.01, rank=4),
}
LOGICAL = {"fc1[gate]": (FFN, HIDDEN), "fc1[up]": (FFN, HIDDEN), "qkv[q]": (HEADS * HEAD_DIM, HIDDEN),
           "qkv[k]": (GROUPS * HEAD_DIM, HIDDEN), "qkv[v]": (GROUPS * HEAD_DIM, HIDDEN)}


def logical(seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(shape, generator=gen) + shift for n, shape in LOGICAL.items()}


def fuse(parts, rank, world):
    """This rank's fused shards of the logical matrices, as megatron-core lays them out."""
    fc1 = torch.cat([parts["fc1[gate]"].chunk(world)[rank], parts["fc1[up]"].chunk(world)[rank]])
    q, k, v = (parts[f"qkv[{b}]"].view(GROUPS, -1, HIDDEN) for b in "qkv")
    local = GROUPS // world
    mine = slice(rank * local, (rank + 1) * local)
    qkv = torch.cat([q[mine], k[mine], v[mine]], dim=1).reshape(-1, HIDDEN)
    return {"fc1": fc1, "qkv": qkv}


def unfuse(shards, world):
    """The logical matrices from every rank's fused shards (the inverse of ``fuse``)."""
    gates, ups = zip(*(s["fc1"].chunk(2) for s in shards))
    per_group = (HEADS // GROUPS + 2) * HEAD_DIM
    groups = torch.cat([s["qkv"].view(-1, per_group, HIDDEN) for s in shards])
    q_rows = HEADS // GROUPS * HEAD_DIM
    return {"fc1[gate]": torch.cat(gates), "fc1[up]": torch.cat(ups),
            "qkv[q]": groups[:, :q_rows].reshape(-1, HIDDEN),
            "qkv[k]": groups[:, q_rows:q_rows + HEAD_DIM].reshape(-1, HIDDEN),
            "qkv[v]": groups[:, q_rows + HEAD_DIM:].reshape(-1, HIDDEN)}


def fused_params(rank, world):
    params = {n: torch.nn.Parameter(t) for n, t in fuse(logical(0), rank, world).items()}
    for p in params.values():
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
    params["fc1"].partition_stride = 2
    params["qkv"].fused_qkv = (HEADS, GROUPS, HEAD_DIM)
    return params


def train_fused(name, mode, within_adamw=False):
    rank, world = dist.get_rank(), dist.get_world_size()
    params = fused_params(rank, world)
    opt = OPTIMIZERS[name]([{"params": list(params.items()), "tensor_parallel": mode,
                             "within_adamw": within_adamw}])
    opt.set_tensor_parallel_group(dist.group.WORLD)
    comm.SENT.clear()
    for t in range(STEPS):
        for n, g in fuse(logical(100 + t, 0.3), rank, world).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach().clone() for n, p in params.items()}, dict(comm.SENT), opt


def train_separate(name, weights, grads_of_step, within_adamw=False):
    """One process stepping ``weights`` (name -> tensor) as separate parameters."""
    params = {n: torch.nn.Parameter(w.clone()) for n, w in weights.items()}
    opt = OPTIMIZERS[name]([{"params": list(params.items()), "within_adamw": within_adamw}])
    for t in range(STEPS):
        for n, g in grads_of_step(t).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach() for n, p in params.items()}


def gather(shards):
    world = dist.get_world_size()
    out = [{} for _ in range(world)]
    for n, t in shards.items():
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        for r in range(world):
            out[r][n] = parts[r]
    return out


def rel_err(a, b):
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in b)


def blocks_of_shard(shard):
    """A rank's fused shards cut into their blocks, by the block names the optimizer uses."""
    gate, up = shard["fc1"].chunk(2)
    per_group = (HEADS // GROUPS + 2) * HEAD_DIM
    q_rows = HEADS // GROUPS * HEAD_DIM
    groups = shard["qkv"].view(-1, per_group, HIDDEN)
    return {"fc1[gate]": gate, "fc1[up]": up, "qkv[q]": groups[:, :q_rows].reshape(-1, HIDDEN),
            "qkv[k]": groups[:, q_rows:q_rows + HEAD_DIM].reshape(-1, HIDDEN),
            "qkv[v]": groups[:, q_rows + HEAD_DIM:].reshape(-1, HIDDEN)}


def checkpoint_round_trip(name, mode):
    """state_dict after 3 steps, loaded into a fresh optimizer: 2 more steps as without the break."""
    rank, world = dist.get_rank(), dist.get_world_size()
    runs = []
    for resume in (False, True):
        params = fused_params(rank, world)
        opt = OPTIMIZERS[name]([{"params": list(params.items()), "tensor_parallel": mode, "within_adamw": False}])
        opt.set_tensor_parallel_group(dist.group.WORLD)
        for t in range(STEPS):
            if resume and t == 3:
                saved = opt.state_dict()
                opt = OPTIMIZERS[name]([{"params": list(params.items()), "tensor_parallel": mode,
                                         "within_adamw": False}])
                opt.set_tensor_parallel_group(dist.group.WORLD)
                opt.load_state_dict(saved)
            for n, g in fuse(logical(100 + t, 0.3), rank, world).items():
                params[n].grad = g
            opt.step()
        runs.append({n: p.detach().clone() for n, p in params.items()})
    return max(float((runs[0][n] - runs[1][n]).abs().max()) for n in runs[0])


def megatron_swiglu(steps=4):
    """megatron-core's ColumnParallelLinear with stride 2 (as its MLP builds linear_fc1 for a gated
    linear unit) and RowParallelLinear, trained through SwiGLU's forward and backward in global
    mode: the same as one process training separate gate, up and down matrices."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    gen = torch.Generator().manual_seed(3)
    gate, up, down = (torch.randn(FFN, HIDDEN, generator=gen), torch.randn(FFN, HIDDEN, generator=gen),
                      torch.randn(HIDDEN, FFN, generator=gen))
    cfg = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True)
    fc1 = ColumnParallelLinear(HIDDEN, 2 * FFN, config=cfg, init_method=lambda w: w.copy_(torch.cat([gate, up])),
                               bias=False, gather_output=False, stride=2)
    fc2 = RowParallelLinear(FFN, HIDDEN, config=cfg, init_method=lambda w: w.copy_(down), bias=False,
                            input_is_parallel=True, skip_bias_add=True)
    stride = fc1.weight.partition_stride
    ours = LDAdam([{"params": [("fc1", fc1.weight), ("fc2", fc2.weight)], "tensor_parallel": "global"}],
                  lr=1e-2, rank=3)
    ref_params = {n: torch.nn.Parameter(t.clone()) for n, t in
                  (("fc1[gate]", gate), ("fc1[up]", up), ("fc2", down))}
    ref = LDAdam(list(ref_params.items()), lr=1e-2, rank=3)
    data = torch.Generator().manual_seed(9)
    for _ in range(steps):
        x = torch.randn(7, HIDDEN, generator=data)
        ours.zero_grad()
        g, u = fc1(x)[0].chunk(2, dim=-1)          # megatron's glu: the local output's two halves
        fc2(torch.nn.functional.silu(g) * u)[0].square().mean().backward()
        ours.step()
        ref.zero_grad()
        h = torch.nn.functional.silu(x @ ref_params["fc1[gate]"].T) * (x @ ref_params["fc1[up]"].T)
        (h @ ref_params["fc2"].T).square().mean().backward()
        ref.step()
    shards = gather({"fc1": fc1.weight.detach(), "fc2": fc2.weight.detach()})
    got = {"fc1[gate]": torch.cat([s["fc1"].chunk(2)[0] for s in shards]),
           "fc1[up]": torch.cat([s["fc1"].chunk(2)[1] for s in shards]),
           "fc2": torch.cat([s["fc2"] for s in shards], dim=1)}
    want = {n: p.detach() for n, p in ref_params.items()}
    parallel_state.destroy_model_parallel()
    return {"stride": stride, "rel_err": rel_err(got, want)}


def megatron_qkv():
    """megatron-core's own attention: ``lowrank_param_groups`` marks its linear_qkv, and the blocks
    the optimizer cuts are the query, key and value projections megatron's forward computes."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from ds_lowrank import lowrank_param_groups
    from ds_lowrank.distributed import fused

    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=1, hidden_size=HIDDEN * 2, num_attention_heads=HEADS,
                            num_query_groups=GROUPS, kv_channels=HEAD_DIM, ffn_hidden_size=FFN,
                            gated_linear_unit=True, use_cpu_initialization=True, add_bias_linear=False,
                            tensor_model_parallel_size=world)
    layer = TransformerLayer(cfg, get_gpt_layer_local_spec().submodules)
    groups = lowrank_param_groups(layer, rank=3)
    names = [n for n, p in groups[0]["params"] if getattr(p, "fused_qkv", None) is not None]
    attn = layer.self_attention
    w = attn.linear_qkv.weight.detach()
    x = torch.randn(5, 2, HIDDEN * 2)
    with torch.no_grad():
        query, key, value = attn.get_query_key_value_tensors(x, None)[:3]
    cut = {b.name: w.index_select(0, b.index(w.device)) for b in fused.blocks("qkv", attn.linear_qkv.weight)}
    # megatron's query is (seq, batch, heads of this rank, head_dim): ours are its rows in order
    err = max(float((x @ cut["q"].T - query.reshape(5, 2, -1)).abs().max()),
              float((x @ cut["k"].T - key.reshape(5, 2, -1)).abs().max()),
              float((x @ cut["v"].T - value.reshape(5, 2, -1)).abs().max()))
    opt = LDAdam(groups)       # built, and its blocks checked, on the real model
    parallel_state.destroy_model_parallel()
    return {"marked": names, "attribute": list(attn.linear_qkv.weight.fused_qkv), "split_err": err,
            "fc1_stride": layer.mlp.linear_fc1.weight.partition_stride, "built": type(opt).__name__}


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world": world}

    def logical_grads(t):
        return logical(100 + t, 0.3)
    for name in ("ldadam", "galore", "adapprox"):
        got, sent, _ = train_fused(name, "global")
        want = train_separate(name, logical(0), logical_grads)
        results[f"global:{name}"] = {"rel_err": rel_err(unfuse(gather(got), world), want),
                                     "reduce": sent.get("reduce", 0), "moved": rel_err(want, logical(0))}
    # blocks whose compressed state would exceed AdamW's take AdamW, as separate parameters would
    got, _, opt = train_fused("ldadam_r4", "global", within_adamw=True)
    want = train_separate("ldadam_r4", logical(0), logical_grads, within_adamw=True)
    qkv = dict(opt.originals(opt.param_groups[0]))["qkv"]
    results["global:dense_blocks"] = {"rel_err": rel_err(unfuse(gather(got), world), want),
                                      "kinds": {b: sorted(st) for b, st in opt.state[qkv].items()}}
    for name in ("ldadam", "galore"):
        got, sent, _ = train_fused(name, "local")
        mine = blocks_of_shard(fuse(logical(0), rank, world))
        want = train_separate(name, mine, lambda t: blocks_of_shard(fuse(logical(100 + t, 0.3), rank, world)))
        errs = [0.0] * world
        dist.all_gather_object(errs, rel_err(blocks_of_shard(got), want))
        results[f"local:{name}"] = {"rel_err": max(errs), "sent": sent}
    results["checkpoint"] = {mode: checkpoint_round_trip("ldadam", mode) for mode in ("global", "local")}
    results["megatron_swiglu"] = megatron_swiglu()
    results["megatron_qkv"] = megatron_qkv()
    finish(out_path, results)


if __name__ == "__main__":
    main()
