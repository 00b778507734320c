"""ds_lowrank.initialize(mpu=megatron.core.parallel_state): 4 ranks as TP 2 × DP 2 under ZeRO 0, 1
and 2 (tests/dist/mpu_worker.py), and what is refused before DeepSpeed starts."""

import os

import pytest
import torch

import ds_lowrank
from ds_lowrank.distributed.tensor_parallel import as_deepspeed_mpu
from ds_lowrank.integration.deepspeed_config import ConfigError
from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "mpu_worker.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return torchrun(4, WORKER, tmp_path_factory.mktemp("mpu") / "result.json")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_tp2_dp2_trains_as_the_same_layout_without_zero(run, stage):
    """Each rank's shards equal the optimizer stepping them directly on the DP-averaged gradient
    (clipped by the whole model's norm, as DeepSpeed's default clipping does through the mpu's
    tensor-parallel group); both DP replicas stay bit-identical."""
    r = run[f"zero{stage}"]
    assert r["rel_err"] < 1e-5 and r["moved"] > 1e-2 and r["replicas"] == 0.0, r
    assert r["dp_world"] == 2 and r["tp_group"] == [0, 1], r


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_partitions_over_the_data_parallel_group(run, stage):
    r = run[f"zero{stage}"]
    assert r["partition_count"] == ([2] if stage == 3 else [2, 2]) and r["layout_groups"] == [2], r


def test_pipeline_parallelism_is_refused_before_deepspeed_starts(run):
    assert run["pipeline"].startswith("ConfigError: mpu=parallel_state with pipeline_model_parallel_size=2"), run


def test_uninitialized_parallel_state_is_refused():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        pytest.skip("megatron's model-parallel groups are set up in this process")
    with pytest.raises(ValueError, match=r"not set up; call parallel_state.initialize_model_parallel"):
        as_deepspeed_mpu(parallel_state)


def test_an_mpu_of_deepspeeds_kind_is_passed_as_it_is_and_others_are_refused():
    class Complete:
        pass
    for name in ("get_model_parallel_world_size", "get_model_parallel_rank", "get_model_parallel_group",
                 "get_data_parallel_world_size", "get_data_parallel_rank", "get_data_parallel_group",
                 "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_rank",
                 "get_tensor_model_parallel_group"):
        setattr(Complete, name, lambda self: None)
    mpu = Complete()
    assert as_deepspeed_mpu(mpu) is mpu and as_deepspeed_mpu(None) is None
    with pytest.raises(ValueError, match=r"neither megatron.core.parallel_state nor .* lacks \['get_model_parallel"):
        as_deepspeed_mpu(object())


def test_microadam_global_mode_under_zero_is_refused_when_the_optimizer_is_built():
    model = torch.nn.Sequential(torch.nn.Linear(6, 8, bias=False))
    w = model[0].weight
    w.tensor_model_parallel, w.partition_dim, w.partition_stride = True, 1, 1
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
           "optimizer": {"type": "MicroAdam", "params": {}}}
    with pytest.raises(ConfigError, match=r"MicroAdam with tensor_parallel='global' does not run on ZeRO flat "
                                          r"partitions: .* use tensor_parallel='local'"):
        ds_lowrank.initialize(model=model, config=cfg,
                              model_parameters=[{"params": [w], "tensor_parallel": "global"}])
