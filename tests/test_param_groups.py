"""lowrank_param_groups on a Hugging Face Llama: embeddings, LM head and norms stay dense."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ds_lowrank import LDAdam, lowrank_param_groups


def tiny_llama(tie=False):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_groups(tie):
    model = tiny_llama(tie)
    groups = lowrank_param_groups(model, rank=8)
    lowrank, dense = groups
    assert lowrank["compress"] and lowrank["rank"] == 8 and not dense["compress"]
    lr_names = {n for n, _ in lowrank["params"]}
    dense_names = {n for n, _ in dense["params"]}
    assert all(n.endswith(("_proj.weight",)) for n in lr_names)
    assert len(lr_names) == 2 * 7   # q, k, v, o, gate, up, down per layer
    assert "model.embed_tokens.weight" in dense_names
    assert ("lm_head.weight" in dense_names) != tie   # a tied head is the embedding itself
    assert any("norm" in n for n in dense_names)
    assert lr_names.isdisjoint(dense_names)


def test_name_patterns_keep_more_dense_and_training_runs():
    model = tiny_llama()
    groups = lowrank_param_groups(model, dense_patterns=[r"\.v_proj\."], rank=4)
    assert not any(".v_proj." in n for n, _ in groups[0]["params"])
    opt = LDAdam(groups, lr=3e-3)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    emb = model.model.embed_tokens.weight
    assert "exp_avg" in opt.state[emb] and "basis" not in opt.state[emb]
    q = model.model.layers[0].self_attn.q_proj.weight
    assert opt.state[q]["basis"].shape == (32, 4)


def test_plain_parameters_make_every_matrix_lowrank():
    model = tiny_llama()
    opt = LDAdam(model.parameters(), rank=4)
    matrices = sum(1 for p in model.parameters() if p.dim() == 2)
    assert matrices == sum(1 for g in opt.param_groups for p in g["params"] if LDAdam.is_compressed(g, p))


def test_rank_error_names_the_parameter():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(16, 32\)"):
        LDAdam(lowrank_param_groups(model, rank=20))


@pytest.mark.parametrize("patterns,needle", [
    ([r"\.v_proj\.", "q_proj("], r"dense_patterns: 'q_proj\(' is not a valid regular expression \(missing \)"),
    ("lm_head", r"dense_patterns='lm_head': expected a list of regular expressions .*not str"),
    ([r"\.v_proj\.", None], r"dense_patterns: None is not a string"),
    (3, r"dense_patterns=3: expected a list of regular expressions"),
])
def test_bad_dense_patterns_are_refused(patterns, needle):
    """A bad regular expression, one string (which would be read letter by letter) or a
    non-string entry: a ValueError naming dense_patterns and the entry."""
    with pytest.raises(ValueError, match=needle):
        lowrank_param_groups(tiny_llama(), dense_patterns=patterns, rank=4)
