"""Model presets: shapes, building from scratch, refusals, parameter counts (without allocating)."""

import json

import pytest
import torch
import torch.nn.functional as F

from ds_lowrank.training.models import available_presets, build_model, count_params, load_preset

# name: hidden, intermediate, heads, layers, vocab, max positions
SHAPES = {
    "tiny": (128, 344, 4, 2, 4096, 256),
    "60m": (512, 1376, 8, 8, 32000, 1024),
    "130m": (768, 2048, 12, 12, 32000, 1024),
    "350m": (1024, 2736, 16, 24, 32000, 1024),
    "1b": (2048, 5461, 32, 24, 32000, 1024),
    "7b": (4096, 11008, 32, 32, 32000, 2048),
}


def llama_params(hidden, intermediate, layers, vocab):
    """Untied embeddings and head, per layer q/k/v/o, gate/up/down and two norms, a final norm."""
    return 2 * vocab * hidden + layers * (4 * hidden**2 + 3 * hidden * intermediate + 2 * hidden) + hidden


def test_every_preset_is_listed():
    assert set(SHAPES) <= set(available_presets())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_preset_shapes(name):
    config = load_preset(name)
    hidden, intermediate, heads, layers, vocab, positions = SHAPES[name]
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_hidden_layers,
            config.vocab_size, config.max_position_embeddings) == SHAPES[name]
    assert config.num_key_value_heads == heads and config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings is False and config.hidden_act == "silu"


@pytest.mark.parametrize("name, low, high", [
    ("60m", 55e6, 65e6), ("130m", 125e6, 140e6), ("350m", 350e6, 380e6), ("1b", 1.3e9, 1.4e9), ("7b", 6.6e9, 6.9e9),
])
def test_parameter_counts(name, low, high):
    config = load_preset(name)
    count = count_params(config)  # built on the meta device: no memory for the weights
    hidden, intermediate, _, layers, vocab, _ = SHAPES[name]
    assert count == llama_params(hidden, intermediate, layers, vocab)
    assert low <= count <= high


def test_tiny_model_trains_a_step():
    config = load_preset("tiny")
    model = build_model(config, seq_len=64, seed=0)
    assert count_params(model) == count_params(config) == llama_params(128, 344, 2, 4096)
    window = torch.randint(0, config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=window[:, :-1]).logits
    assert logits.shape == (2, 64, config.vocab_size)
    loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), window[:, 1:].reshape(-1))
    assert abs(loss.item() - torch.log(torch.tensor(4096.0)).item()) < 0.5  # near uniform at init
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_build_options():
    config = load_preset("tiny")
    a, b = build_model(config, 32, seed=1), build_model(config, 32, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    state = torch.random.get_rng_state()
    small = build_model(config, 32, vocab_size=300, dtype=torch.bfloat16, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # a seeded build leaves global RNG alone
    assert small.get_input_embeddings().weight.shape == (300, 128) and small.lm_head.weight.dtype == torch.bfloat16
    assert config.vocab_size == 4096  # the caller's config is not modified
    meta = build_model(load_preset("1b"), 1024, device="meta")
    assert meta.lm_head.weight.is_meta


def test_too_long_sequence_names_both_numbers():
    with pytest.raises(ValueError, match=r"seq_len 512 exceeds the model's max_position_embeddings 256; "
                                         r"use a sequence length of at most 256"):
        build_model(load_preset("tiny"), seq_len=512)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError) as info:
        load_preset("3b")
    message = str(info.value)
    assert "unknown model preset '3b'" in message and "To add one" in message and "3b.json" in message
    assert all(name in message for name in SHAPES)


def test_config_files_and_preset_directories(tmp_path):
    fields = json.loads(load_preset("tiny").to_json_string())
    fields["num_hidden_layers"] = 3
    (tmp_path / "three.json").write_text(json.dumps(fields))
    assert load_preset(tmp_path / "three.json").num_hidden_layers == 3
    assert load_preset("three", presets_dir=tmp_path).num_hidden_layers == 3
    assert available_presets(tmp_path) == ["three"]
    with pytest.raises(ValueError, match=r"unknown model preset 'tiny'.*: three\."):
        load_preset("tiny", presets_dir=tmp_path)
    with pytest.raises(ValueError, match=r"model config file .*missing\.json' does not exist"):
        load_preset(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_preset(tmp_path / "bad.json")
    (tmp_path / "gpt.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'; only 'llama'"):
        load_preset(tmp_path / "gpt.json")


@pytest.mark.parametrize("content,needle", [
    (b"\x89PNG\r\n\x1a\n\x00", r"is not a JSON text file \(byte 0 is not UTF-8 text\)"),
    (b"", r"is not valid JSON"),
    (b"{}", r"is not a LlamaConfig: it lacks hidden_size, intermediate_size, num_attention_heads, "
            r"num_hidden_layers, vocab_size, which LlamaConfig would fill with Llama-7B's sizes"),
    (json.dumps({"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "LDAdam"}}).encode(),
     r"is not a LlamaConfig.*it looks like a DeepSpeed config \(pass that with --deepspeed_config\)"),
])
def test_garbage_files_are_refused(tmp_path, content, needle):
    (tmp_path / "m.json").write_bytes(content)
    with pytest.raises(ValueError, match=needle):
        load_preset(tmp_path / "m.json")


@pytest.mark.parametrize("change,needle", [
    (dict(hidden_size="big"), r"hidden_size 'big' must be a positive integer"),
    (dict(num_attention_heads=0), r"num_attention_heads 0 must be a positive integer"),
    (dict(num_hidden_layers=2.5), r"num_hidden_layers 2\.5 must be a positive integer"),
    (dict(vocab_size=True), r"vocab_size True must be a positive integer"),
    (dict(num_key_value_heads=3), r"num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    (dict(hidden_act="swish2"), r"unknown hidden_act 'swish2'"),
    (dict(tie_word_embeddings="no"), r"is not a valid LlamaConfig: .*tie_word_embeddings.*fix that field"),
])
def test_bad_fields_are_refused_naming_them(tmp_path, change, needle):
    fields = {**json.loads(load_preset("tiny").to_json_string()), **change}
    (tmp_path / "m.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=needle):
        load_preset(tmp_path / "m.json")
