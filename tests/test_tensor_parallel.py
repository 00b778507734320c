"""Megatron tensor-parallel shards: tensor_parallel="global" equals one process at TP 2 and 3
(real launches over gloo, tests/dist/tp_worker.py); "local" steps each shard on its own."""

import os

import pytest
import torch

from ds_lowrank import LDAdam
from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "tp_worker.py")


@pytest.fixture(scope="module", params=[2, 3], ids=["tp2", "tp3"])
def run(request, tmp_path_factory):
    return torchrun(request.param, WORKER, tmp_path_factory.mktemp(f"tp{request.param}") / "result.json",
                    timeout=600)


def test_global_mode_equals_one_process_stepping_the_whole_matrices(run):
    """Column- and row-parallel shards, tall, wide and square, both projection sides, and
    matrices whose gradients are rank-deficient (the basis completion agrees on every rank)."""
    runs = {k: v for k, v in run.items() if k.startswith("global:")}
    assert len(runs) == 5
    for name, r in runs.items():
        assert r["rel_err"] < 1e-5 and r["reduce"] > 0, (name, r)


def test_local_mode_steps_each_shard_alone(run):
    r = run["local:ldadam"]
    assert r["rel_err"] < 1e-7 and r["sent"] == {}, r
    assert r["vs_one_process"] > 1e-3, r          # and so depends on the TP size


def test_a_shard_skipped_on_one_rank_is_skipped_on_all(run):
    assert run["skip"] == {"skipped": 1, "finite": True}


def test_megatron_layers_through_forward_and_backward(run):
    """megatron.core's ColumnParallelLinear and RowParallelLinear, the TP group found through its
    parallel_state: the global mode equals one process training the whole layers."""
    r = run["megatron"]
    assert r["attributes"] == [0, 1] and r["rel_err"] < 1e-5, r


def test_global_shards_are_checked_against_the_whole_matrix(run):
    assert run["rank_checked_whole"]


def shard_param(shape=(4, 8), dim=0, stride=1):
    p = torch.nn.Parameter(torch.randn(shape))
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, stride
    p.grad = torch.randn(shape)
    return p


def test_bad_tensor_parallel_settings_are_refused():
    with pytest.raises(ValueError, match=r"invalid tensor_parallel='both'.*one of \('local', 'global'\)"):
        LDAdam([{"params": [shard_param()], "tensor_parallel": "both"}], rank=2)
    opt = LDAdam([{"params": [shard_param()], "tensor_parallel": "global"}], rank=2)
    with pytest.raises(RuntimeError, match="needs the tensor-parallel process group.*set_tensor_parallel_group"):
        opt.step()
