"""The DeepSpeed config's optimizer section, and the settings ds_lowrank refuses (no launch needed)."""

import glob
import json
import os

import pytest
import torch

from ds_lowrank import LDAdam
from ds_lowrank.integration.deepspeed import deepspeed_optimizers, initialize
from ds_lowrank.integration.deepspeed_config import (ConfigError, build_optimizer, check_zero_config,
                                                     load_config, optimizer_class)
from ds_lowrank.training.models import build_model, load_preset

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
# Every DeepSpeed config shipped at the top of configs/ (configs/models holds model presets).
SHIPPED = sorted(glob.glob(os.path.join(CONFIGS, "*.json")))


def model():
    return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 24), torch.nn.Linear(24, 50))


@pytest.mark.parametrize("kind", ["LDAdam", "ldadam", "LDADAM"])
def test_type_names_are_case_insensitive(kind):
    opt = build_optimizer(model(), {"type": kind, "params": {"rank": 4, "betas": [0.9, 0.99]}})
    assert isinstance(opt, LDAdam)
    lowrank, dense = opt.param_groups
    assert lowrank["rank"] == 4 and lowrank["betas"] == (0.9, 0.99)
    assert [n for n in dense["param_names"] if n.startswith("0.")] == ["0.weight"]   # embedding dense


def test_unknown_type_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown optimizer type 'LDAdamm'.*LDAdam.*MicroAdam"):
        build_optimizer(model(), {"type": "LDAdamm"})


def test_unknown_type_lists_each_optimizer_once():
    with pytest.raises(ConfigError) as err:
        optimizer_class({"type": "Lion"})
    listed = str(err.value).split("use one of ")[1].split(" (")[0]
    assert listed == "Adapprox, GaLoreAdamW, LDAdam, MicroAdam"
    assert "galore for GaLoreAdamW" in str(err.value)


def test_unknown_params_are_listed():
    with pytest.raises(ConfigError, match=r"unknown LDAdam params \['rnk'\]: valid ones are .*'rank'"):
        build_optimizer(model(), {"type": "LDAdam", "params": {"rnk": 4}})


def test_invalid_values_name_the_key():
    with pytest.raises(ConfigError, match=r"invalid rank=0"):
        build_optimizer(model(), {"type": "LDAdam", "params": {"rank": 0}})
    with pytest.raises(ConfigError, match=r"rank=40 is larger than 1\.weight's projected dimension"):
        build_optimizer(model(), {"type": "LDAdam", "params": {"rank": 40}})


# --------------------------------------------------------------------------- hostile input

@pytest.mark.parametrize("params,needle", [
    ({"betas": 0.9}, r"invalid betas=0\.9: expected two floats.*a list such as \[0\.908, 0\.99\]"),
    ({"betas": None}, r"invalid betas=None: expected two floats"),
    ({"eps": True}, r"invalid eps=True: expected a finite non-negative float"),
    ({"betas": [True, 0.99]}, r"invalid betas=\(True, 0\.99\)"),
    ({"rank": 4.5}, r"invalid rank=4\.5: expected a positive int"),
    ({"rank": -2}, r"invalid rank=-2: expected a positive int"),
    ({"ef_dtype": ["float32"]}, r"invalid ef_dtype=\['float32'\]: expected one of"),
])
def test_bad_values_are_refused_naming_the_key(params, needle):
    with pytest.raises(ConfigError, match="optimizer params: " + needle):
        build_optimizer(model(), {"type": "LDAdam", "params": params})


@pytest.mark.parametrize("patterns,needle", [
    (["("], r"dense_patterns: '\(' is not a valid regular expression \(missing \).*backslash"),
    ("lm_head", r"dense_patterns='lm_head': expected a list of regular expressions"),
    ([3], r"dense_patterns: 3 is not a string"),
])
def test_bad_dense_patterns_are_refused(patterns, needle):
    with pytest.raises(ConfigError, match="optimizer params: " + needle):
        build_optimizer(model(), {"type": "LDAdam", "params": {"rank": 4, "dense_patterns": patterns}})


def test_dense_patterns_need_the_model_not_model_parameters():
    section = {"type": "LDAdam", "params": {"rank": 4, "dense_patterns": ["^2\\."]}}
    with pytest.raises(ConfigError, match=r"\['dense_patterns'\] choose the parameter groups from the model"):
        build_optimizer(model(), section, model_parameters=model().parameters())


@pytest.mark.parametrize("section,needle", [
    ([{"type": "LDAdam", "params": {"rank": 4}}], r'"optimizer" section must be one object .*not a list; '
                                                  r'remove the \[ \] around it'),
    ("LDAdam", r'"optimizer" section must be one object such as \{"type": "LDAdam".*not a string'),
    ({"type": "LDAdam", "params": [4]}, r'"optimizer.params" must be an object .*not a list'),
    ({"type": "LDAdam", "params": None}, r'"optimizer.params" must be an object .*not null'),
    ({"type": "LDAdam", "param": {"rank": 4}}, r"unknown keys \['param'\] in the \"optimizer\" section.*"
                                              r'options go inside "params"'),
])
def test_malformed_optimizer_section(section, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config({"optimizer": section})
    with pytest.raises(ConfigError, match=needle):
        build_optimizer(model(), section)
    with pytest.raises(ConfigError, match=needle):
        initialize(model=model(), config={"optimizer": section})


@pytest.mark.parametrize("zero,needle", [
    ({"stage": "2"}, r"zero_optimization\.stage='2' is not a ZeRO stage: use 0, 1, 2 or 3 \(a number, "
                     r'not a string: "stage": 2\)'),
    ({"stage": 7}, r"zero_optimization\.stage=7 is not a ZeRO stage: use 0, 1, 2 or 3"),
    ({"stage": -1}, r"zero_optimization\.stage=-1 is not a ZeRO stage"),
    ({"stage": True}, r"zero_optimization\.stage=True is not a ZeRO stage"),
    ({"stage": None}, r"zero_optimization\.stage=None is not a ZeRO stage"),
    ({"stage": 2, "offload_optimizer": "cpu"}, r"zero_optimization\.offload_optimizer='cpu': use an object "
                                               r'such as \{"device": "cpu"\}'),
    ({"stage": 2, "round_robin_gradients": "false"}, r"round_robin_gradients='false': use true or false"),
    ({"stage": 3, "mics_shard_size": "4"}, r"mics_shard_size='4': use an integer"),
    ([{"stage": 2}], r'"zero_optimization" must be an object such as \{"stage": 2\}'),
])
def test_malformed_zero_settings(zero, needle):
    cfg = {"zero_optimization": zero, "optimizer": {"type": "LDAdam", "params": {"rank": 4}}}
    with pytest.raises(ConfigError, match=needle):
        check_zero_config(cfg)
    with pytest.raises(ConfigError, match=needle):
        load_config(cfg)
    with pytest.raises(ConfigError, match=needle):
        initialize(model=model(), config=cfg)


def test_malformed_config_files(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="a DeepSpeed config is a JSON object of settings, not a list"):
        load_config(tmp_path / "list.json")
    (tmp_path / "binary.json").write_bytes(b"\x80\x81 \x00")
    with pytest.raises(ConfigError, match=r"binary\.json is not a JSON text file \(byte 0 is not UTF-8"):
        load_config(tmp_path / "binary.json")
    (tmp_path / "sched.json").write_text(json.dumps({"scheduler": {"type": "WarmupLR", "params": [1]}}))
    with pytest.raises(ConfigError, match=r'"scheduler" must be an object .*"params" an object'):
        load_config(tmp_path / "sched.json")


@pytest.mark.parametrize("zero,needle", [
    ({"round_robin_gradients": True}, "round_robin_gradients=true"),
    ({"elastic_checkpoint": True}, "elastic_checkpoint=true"),
    ({"offload_optimizer": {"device": "nvme"}}, "offload_optimizer.device=nvme"),
    ({"offload_param": {"device": "nvme"}}, "offload_param.device=nvme"),
    ({"mics_shard_size": 2}, "mics_shard_size"),
    ({"zenflow": {"topk_ratio": 0.1}}, "zenflow"),
])
def test_unsupported_zero_settings_are_refused(zero, needle):
    cfg = {"zero_optimization": {"stage": 2, **zero}, "optimizer": {"type": "LDAdam", "params": {"rank": 4}}}
    with pytest.raises(ConfigError, match="ds_lowrank cannot run with zero_optimization." + needle.replace(".", r"\.")):
        check_zero_config(cfg)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        initialize(model=model(), config=cfg)   # refused before DeepSpeed is even started


def test_supported_zero_settings_pass():
    for stage in (0, 1, 2, 3):
        for device in ("none", "cpu"):
            check_zero_config({"zero_optimization": {"stage": stage, "offload_optimizer": {"device": device}}})


@pytest.mark.parametrize("name", ["ldadam_zero1", "ldadam_zero2", "ldadam_zero3", "adamw_zero2"])
def test_shipped_configs(name):
    cfg = load_config(os.path.join(CONFIGS, f"{name}.json"))
    assert cfg["bf16"]["enabled"] and cfg["gradient_clipping"] == 1.0
    assert cfg["scheduler"]["type"] == "WarmupCosineLR"
    check_zero_config(cfg)
    if name.startswith("ldadam"):
        assert cfg["zero_optimization"]["stage"] == int(name[-1])
        assert isinstance(build_optimizer(model(), cfg["optimizer"] | {"params": {**cfg["optimizer"]["params"], "rank": 8}}), LDAdam)
    else:
        assert cfg["optimizer"]["type"] == "AdamW"
        ld = load_config(os.path.join(CONFIGS, "ldadam_zero2.json"))
        same = {k: v for k, v in cfg.items() if k != "optimizer"}
        assert same == {k: v for k, v in ld.items() if k != "optimizer"}   # the same run, AdamW


def test_load_config_copies():
    cfg = {"optimizer": {"type": "LDAdam"}}
    loaded = load_config(cfg)
    loaded["optimizer"]["type"] = "x"
    assert cfg["optimizer"]["type"] == "LDAdam"
    assert json.dumps(load_config(os.path.join(CONFIGS, "ldadam_zero2.json")))


# --------------------------------------------------------------------------- every shipped config

def shipped_id(path):
    return os.path.splitext(os.path.basename(path))[0]


def build_shipped_optimizer(model, section):
    """The optimizer a shipped config names, as the run would get it: ds_lowrank's from the
    section; a DeepSpeed type (AdamW) as torch's class of that name, whose options DeepSpeed's
    AdamW shares."""
    if section["type"].lower() in deepspeed_optimizers():
        cls = getattr(torch.optim, section["type"])
        params = {k: tuple(v) if k == "betas" else v for k, v in section.get("params", {}).items()}
        return cls(model.parameters(), **params)
    optimizer_class(section)     # a type ds_lowrank knows, or ConfigError
    return build_optimizer(model, section)


def test_configs_are_found():
    names = {shipped_id(p) for p in SHIPPED}
    assert {"ldadam_zero2", "adamw_zero2", "galore_zero2", "adapprox_zero2", "microadam_zero2"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=shipped_id)
def test_shipped_config_parses_and_matches_the_ldadam_run(path):
    cfg = load_config(path)
    check_zero_config(cfg)
    kind = cfg["optimizer"]["type"].lower()
    assert kind in deepspeed_optimizers() or optimizer_class(cfg["optimizer"])
    # Configs differ from the LDAdam config of their ZeRO stage only in the optimizer, so runs
    # with different optimizers compare like for like.
    stage = cfg["zero_optimization"]["stage"]
    reference = load_config(os.path.join(CONFIGS, f"ldadam_zero{stage}.json"))
    assert {k: v for k, v in cfg.items() if k != "optimizer"} == \
        {k: v for k, v in reference.items() if k != "optimizer"}


@pytest.fixture(scope="module")
def tiny_llama_batch():
    """Random tokens for the ``tiny`` preset, the model the shipped configs' ranks are sized for."""
    gen = torch.Generator().manual_seed(0)
    config = load_preset("tiny")
    return config, torch.randint(config.vocab_size, (2, 17), generator=gen)


@pytest.mark.parametrize("path", SHIPPED, ids=shipped_id)
def test_shipped_config_builds_its_optimizer_and_steps(path, tiny_llama_batch):
    config, tokens = tiny_llama_batch
    model = build_model(config, tokens.shape[1], seed=0)
    opt = build_shipped_optimizer(model, load_config(path)["optimizer"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(input_ids=tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    assert getattr(opt, "skipped_steps", 0) == 0
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p, before[name]), f"{name} did not move"
    if hasattr(opt, "state_bytes"):
        assert opt.state_bytes()["total"] > 0
