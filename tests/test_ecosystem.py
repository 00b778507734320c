"""ds_lowrank's optimizers through HF Trainer (with and without DeepSpeed ZeRO-2/3), accelerate's
DeepSpeed plugin and plain deepspeed.initialize, on a tiny Llama.

One torchrun launch (tests/dist/hf_worker.py) trains every route 4 steps on the same batches;
the tests assert that each route ran the expected optimizer: losses equal to a plain torch loop
of LDAdam over lowrank_param_groups, and unlike Trainer's AdamW.
"""

import argparse
import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import free_port, torchrun
from transformers import LlamaConfig, LlamaForCausalLM

import ds_lowrank
from ds_lowrank import LDAdam, lowrank_param_groups
from ds_lowrank.integration.deepspeed_config import ConfigError
from ds_lowrank.param_groups import embedding_parameters, lowrank_embeddings, warn_lowrank_embeddings

WORKER = os.path.join(os.path.dirname(__file__), "dist", "hf_worker.py")
TOL = 2e-6


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    work = tmp_path_factory.mktemp("hf")
    return torchrun(1, WORKER, work / "result.json", work)


def close(a, b, tol=TOL):
    return len(a) == len(b) and all(abs(x - y) <= tol * abs(y) for x, y in zip(a, b))


def test_reference_is_not_adamw(routes):
    """The routes below are told apart from Trainer's default AdamW by their losses."""
    assert routes["adamw"][0] == routes["reference"][0]          # same model, same first batch
    assert not close(routes["adamw"][1:], routes["reference"][1:], 1e-4)
    lowrank = routes["reference_lowrank"]
    assert len(lowrank) == 14 and all(".self_attn." in n or ".mlp." in n for n in lowrank)


@pytest.mark.parametrize("route", ["plain", "plain_instance", "ds2_config", "ds2_lowrank_trainer",
                                   "ds2_lowrank_trainer_instance", "accelerate"])
def test_route_trains_ldadam(routes, route):
    """Trainer without DeepSpeed (LowRankTrainer, or an instance in optimizers=), Trainer with
    "type": "LDAdam" in a ZeRO-2 config ("auto" values filled by Trainer), LowRankTrainer's
    optimizer (built, or the instance it was given) handed to DeepSpeed, accelerate's DummyOptim:
    LDAdam, the reference's losses."""
    r = routes[route]
    assert r["optimizer"] in ("LDAdam", "AcceleratedOptimizer" if route.startswith("plain") else "LDAdam")
    assert close(r["losses"], routes["reference"]), (r["losses"], routes["reference"])
    assert not r.get("warnings")


def test_plain_trainer_optimizer_is_ldadam(routes):
    assert routes["plain"]["optimizer"] == routes["plain_instance"]["optimizer"] == "LDAdam"


def test_trainer_zero3(routes):
    """ZeRO-3 with the model partitioned as it is built (zero.Init), the optimizer named in the
    config or built by LowRankTrainer: the groups are found from the whole shapes, and the
    losses are those of LDAdam on the same initial weights."""
    assert routes["ds3_partitioned_at_init"]
    for route in ("ds3_config", "ds3_lowrank_trainer"):
        r = routes[route]
        assert r["optimizer"] == "LDAdam" and not r["warnings"]
        assert close(r["losses"], routes["ds3_reference"], 1e-5), (route, r["losses"], routes["ds3_reference"])
    assert routes["ds3_lowrank_trainer"]["same_initial_weights"]


@pytest.mark.parametrize("route", ["plain", "ds2_config"])
def test_trainer_resume_is_exact(routes, route):
    """Trainer's own checkpoint at step 2 (optimizer.pt, or DeepSpeed's checkpoint) and
    resume_from_checkpoint: steps 3 and 4 as in the uninterrupted run."""
    resumed = routes[route + "_resumed"]
    assert resumed["optimizer"] == "LDAdam"
    assert resumed["losses"] == routes[route]["losses"][2:]


def test_plain_deepspeed_every_argument_form(routes):
    """After register_deepspeed_optimizers, deepspeed.initialize(args=Namespace(deepspeed_config=...))
    builds LDAdam; ds_lowrank.initialize takes deepspeed.initialize's argument forms."""
    assert not routes["plain_deepspeed"]["warnings"]
    forms = routes["plain_deepspeed"]["forms"]
    assert len(forms) == 4
    for name, r in forms.items():
        assert r["optimizer"] == "LDAdam", name
        assert close(r["losses"], routes["reference"][:2]), (name, r["losses"])


@pytest.mark.parametrize("route,state", [("ds2_dropped", "was discarded before its first step"),
                                         ("ds2_dropped_held", "has not taken a step"),
                                         ("ds0_dropped", "was discarded before its first step"),
                                         ("ds3_dropped", "was discarded before its first step")])
def test_dropped_optimizer_is_told(routes, route, state):
    """Plain Trainer under DeepSpeed (ZeRO-2, -3 and stage 0, nothing registered) drops
    optimizers=(LDAdam(...), None) and trains AdamW: one warning, at the first sign, says so and
    names the fixes, whether the instance was garbage-collected there or is still referenced."""
    dropped = routes[route]
    assert dropped["optimizer"] == "AdamW"
    if "losses" in dropped:
        assert close(dropped["losses"], routes["adamw"][:2], 1e-5), (dropped["losses"], routes["adamw"])
    assert len(dropped["warnings"]) == 1, dropped["warnings"]
    message = dropped["warnings"][0]
    assert f"LDAdam built over 21 parameters (lm_head.weight, ...) {state}" in message
    assert "another optimizer is training them" in message
    assert "LowRankTrainer" in message and "register_deepspeed_optimizers()" in message


def test_routes_that_train_ldadam_do_not_warn(routes):
    """No false alarm: every route where a ds_lowrank optimizer is the one trained (plain torch
    in the reference, Trainer with and without DeepSpeed, resumed, accelerate, plain DeepSpeed)
    raises no ds_lowrank warning, though optimizers are built, wrapped by ZeRO and dropped."""
    quiet = {name: r["warnings"] for name, r in routes.items()
             if isinstance(r, dict) and "warnings" in r and "dropped" not in name and name != "ds2_cls_and_kwargs"}
    assert len(quiet) == 12 and not any(quiet.values()), quiet


def test_lowrank_embeddings_are_told(routes):
    """optimizer_cls_and_kwargs builds LDAdam over every matrix: a warning names the embedding
    and LM head."""
    told = routes["ds2_cls_and_kwargs"]
    assert told["optimizer"] == "LDAdam"
    assert any("model.embed_tokens.weight" in w and "lm_head.weight" in w and "lowrank_param_groups" in w
               for w in told["warnings"])


# -- in-process checks (no DeepSpeed engine) ---------------------------------------------------


def tiny_llama(tie=False):
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=tie))


@pytest.mark.parametrize("params,needle", [
    ({"lr": "auto", "rank": 4}, r"\['lr'\] are \"auto\": HF Trainer .* fill \"auto\" values .*Write numbers"),
    ({"lr": 1e-3, "betas": "auto", "weight_decay": "auto"}, r"\['betas', 'weight_decay'\] are \"auto\""),
])
def test_auto_values_say_who_fills_them(params, needle):
    with pytest.raises(ConfigError, match=needle):
        ds_lowrank.initialize(model=tiny_llama(), config={"optimizer": {"type": "LDAdam", "params": params}})


def test_config_given_twice_is_refused():
    cfg = {"optimizer": {"type": "LDAdam"}}
    with pytest.raises(ConfigError, match="config=... or config_params=..., not both"):
        ds_lowrank.initialize(model=tiny_llama(), config=cfg, config_params=cfg)
    with pytest.raises(ConfigError, match="both in args.deepspeed_config and as config="):
        ds_lowrank.initialize(argparse.Namespace(deepspeed_config=cfg), tiny_llama(), config=cfg)
    with pytest.raises(ConfigError, match="no DeepSpeed config"):
        ds_lowrank.initialize(model=tiny_llama())


def test_earlier_positional_form_still_reads_model_and_config():
    """initialize(model, config), the form before deepspeed.initialize's order: read as such, with
    a DeprecationWarning (here refused before DeepSpeed starts, for its "auto" learning rate)."""
    with pytest.warns(DeprecationWarning, match="pass model=..., config=..."):
        with pytest.raises(ConfigError, match=r"\['lr'\] are \"auto\""):
            ds_lowrank.initialize(tiny_llama(), {"optimizer": {"type": "LDAdam", "params": {"lr": "auto"}}})


def test_registration_is_explicit_and_undone():
    """Nothing on import; register teaches the engine the names (DeepSpeed's own still pass);
    unregister restores DeepSpeed's methods."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    before = DeepSpeedEngine.__dict__["_is_supported_optimizer"]
    assert not DeepSpeedEngine._is_supported_optimizer(None, "LDAdam")
    ds_lowrank.register_deepspeed_optimizers()
    try:
        for name in ("LDAdam", "galoreadamw", "Adapprox", "MicroAdam", "adamw"):
            assert DeepSpeedEngine._is_supported_optimizer(None, name), name
        assert not DeepSpeedEngine._is_supported_optimizer(None, "NoSuchOptimizer")
    finally:
        ds_lowrank.unregister_deepspeed_optimizers()
    assert DeepSpeedEngine.__dict__["_is_supported_optimizer"] is before


def test_registration_refuses_other_deepspeed_versions(monkeypatch):
    import deepspeed
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.raises(RuntimeError, match=r"supports DeepSpeed 0\.19\.x, not 0\.21\.0.*ds_lowrank\.initialize"):
        ds_lowrank.register_deepspeed_optimizers()
    assert not ds_lowrank.integration.deepspeed.deepspeed_optimizers_registered()


class Wrapper(torch.nn.Module):
    """Holds the model as DeepSpeed's engine and DDP do: one child, ``module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("tie", [False, True])
def test_embeddings_recognised_on_hf_and_wrapped_models(tie):
    model = tiny_llama(tie)
    found = set(embedding_parameters(model).values())
    assert "model.embed_tokens.weight" in found or "lm_head.weight" in found
    assert len(embedding_parameters(model)) == (1 if tie else 2)
    wrapped = Wrapper(model)
    assert set(embedding_parameters(wrapped)) == set(embedding_parameters(model))
    names = [n for g in lowrank_param_groups(wrapped, rank=4) if g["compress"] for n, _ in g["params"]]
    assert names and all(n.startswith("model.layers.") for n in names)


def test_target_modules_as_optim_target_modules():
    model = tiny_llama()
    def lowrank(**kw):
        return {n for g in lowrank_param_groups(model, rank=4, **kw) if g["compress"] for n, _ in g["params"]}
    assert lowrank(target_modules=["self_attn"]) == {f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkvo"}
    assert lowrank(target_modules=r".*\.(q|v)_proj") == {f"model.layers.0.self_attn.{x}_proj.weight" for x in "qv"}
    assert lowrank(target_modules="all-linear") == lowrank()          # lm_head stays dense
    assert "lm_head.weight" not in lowrank(target_modules=["lm_head", "mlp"])
    with pytest.raises(ValueError, match="selects no matrix"):
        lowrank(target_modules=["nothing"])


def test_plain_parameters_warn_once_about_embeddings(monkeypatch):
    model = tiny_llama()
    opt = LDAdam(model.parameters(), rank=4)
    monkeypatch.setattr(ds_lowrank.param_groups, "_warned", set())     # the constructor warned already
    assert set(lowrank_embeddings(opt, model)) == {"model.embed_tokens.weight", "lm_head.weight"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_lowrank_embeddings(opt, model)
        warn_lowrank_embeddings(opt, model)
    assert len([w for w in caught if "compresses the embedding" in str(w.message)]) == 1
    assert lowrank_embeddings(LDAdam(lowrank_param_groups(model, rank=4)), model) == []


def _embedding_warnings(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    return [str(w.message) for w in caught if "compresses the embedding" in str(w.message)]


def test_bare_parameters_are_told_where_the_caller_holds_the_model(monkeypatch):
    """Built over model.parameters() (no names), the optimizer finds the model among its callers'
    variables and says which embeddings it compresses; built over named groups, or where no
    caller holds the model, it says nothing."""
    monkeypatch.setattr(ds_lowrank.param_groups, "_warned", set())
    model = tiny_llama()
    told = _embedding_warnings(lambda: LDAdam(model.parameters(), rank=4))
    assert len(told) == 1 and "model.embed_tokens.weight" in told[0] and "lm_head.weight" in told[0]
    monkeypatch.setattr(ds_lowrank.param_groups, "_warned", set())
    assert _embedding_warnings(lambda: LDAdam(lowrank_param_groups(model, rank=4))) == []
    params = list(tiny_llama().parameters())        # the model is gone: nothing to read
    assert _embedding_warnings(lambda: LDAdam(params, rank=4)) == []


def test_trainer_optimizer_cls_and_kwargs_without_deepspeed_is_told(monkeypatch, tmp_path):
    """HF Trainer's optimizer_cls_and_kwargs builds the class over every parameter, without names,
    in create_optimizer (opt_model in hand): told, with no DeepSpeed and no registration."""
    from transformers import Trainer, TrainingArguments

    monkeypatch.setattr(ds_lowrank.param_groups, "_warned", set())
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=tiny_llama(), args=args, optimizer_cls_and_kwargs=(LDAdam, {"rank": 4}))
    told = _embedding_warnings(trainer.create_optimizer)
    assert len(told) == 1 and "model.embed_tokens.weight" in told[0], told


def test_megatron_embedding_and_output_layer_are_dense():
    """megatron-core's GPTModel: VocabParallelEmbedding (not an nn.Embedding) and output_layer."""
    pytest.importorskip("megatron.core")
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        try:
            model_parallel_cuda_manual_seed(0)
        except Exception:
            pass
        cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True)
        model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=40, max_sequence_length=8,
                         share_embeddings_and_output_weights=False)
        embeddings = set(embedding_parameters(model).values())
        assert {"embedding.word_embeddings.weight", "output_layer.weight"} <= embeddings
        lowrank = [n for g in lowrank_param_groups(model, rank=4) if g["compress"] for n, _ in g["params"]]
        assert lowrank and not any(n.startswith(("embedding.", "output_layer.")) for n in lowrank)
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


# -- an optimizer whose parameters something else trains ----------------------------------------


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _train(model, optimizer, steps=3, accumulate=1):
    for step in range(steps):
        for micro in range(accumulate):
            x = torch.randn(4, 12, generator=torch.Generator().manual_seed(10 * step + micro))
            model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _told(caught):
    return [str(w.message) for w in caught if "another optimizer is training them" in str(w.message)]


def test_an_optimizer_in_use_is_not_told_about_and_stops_watching():
    """Plain torch use (gradient accumulation included), a dropped-and-rebuilt optimizer, and
    one built and dropped without training: no warning; a step removes the hooks."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _mlp()
        optimizer = LDAdam(model.parameters(), rank=2)
        _train(model, optimizer, accumulate=3)
        assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
        model = _mlp()
        LDAdam(model.parameters(), rank=2)                       # dropped, then built again and used
        _train(model, LDAdam(model.parameters(), rank=2))
        LDAdam(_mlp().parameters(), rank=2)
    assert not _told(caught)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("held", [False, True])
def test_an_optimizer_that_another_one_replaced_is_told(fused, held):
    """LDAdam built and then not used while torch's AdamW trains the same parameters: one warning
    at the second backward pass, whether the instance is kept or garbage-collected (torch's
    fused AdamW leaves the version counters alone: the values tell)."""
    model = _mlp()
    kept = LDAdam(model.parameters(), rank=2) if held else None
    if not held:
        LDAdam(model.parameters(), rank=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused), steps=4)
    told = _told(caught)
    assert len(told) == 1, told
    state = "has not taken a step" if held else "was discarded before its first step"
    assert f"the LDAdam built over 4 parameters (param_groups[0]['params'][3], ...) {state}" in told[0]
    assert "they changed between backward passes" in told[0]
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    del kept


# -- the README's examples ------------------------------------------------------------------------


def _readme_examples():
    """The python blocks of the README's section on Trainer, accelerate, DeepSpeed and Megatron,
    except the one that needs CUDA."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme[readme.index("## With HF Trainer"):readme.index("## Under Megatron tensor parallelism")]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 5
    return [b for b in blocks if "needs CUDA" not in b.splitlines()[0]]


@pytest.mark.parametrize("index", range(4))
def test_readme_example_runs(index, tmp_path):
    """Each example runs as printed (under torchrun, one CPU process), and no ds_lowrank optimizer
    in it sees another optimizer train its parameters (that warning is made an error)."""
    script = tmp_path / "train.py"
    script.write_text(_readme_examples()[index])
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="error::UserWarning:torch.autograd.graph")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           str(script)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "another optimizer is training them" not in proc.stderr
