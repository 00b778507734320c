"""Parameter groups for a model: which weights are low-rank and which stay dense."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

# Names that mark the LM head (HF Llama: "lm_head"; GPT-2: tied to "wte"; Megatron: "output_layer").
DEFAULT_DENSE_PATTERNS = (r"(^|\.)lm_head\.", r"(^|\.)output_layer\.", r"(^|\.)embed_out\.")


def _embedding_params(model: nn.Module) -> set[int]:
    """ids of every embedding and output-embedding parameter."""
    ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if isinstance(out, nn.Module):
        ids.update(id(p) for p in out.parameters())
    return ids


def _compile(dense_patterns: Iterable[str]) -> list[re.Pattern]:
    """The regular expressions of ``dense_patterns``, or a ValueError naming the one at fault."""
    example = r'e.g. [r"\.v_proj\."]'
    if isinstance(dense_patterns, (str, bytes)) or not isinstance(dense_patterns, Iterable):
        raise ValueError(f"dense_patterns={dense_patterns!r}: expected a list of regular expressions "
                         f"({example}), not {type(dense_patterns).__name__}")
    compiled = []
    for pattern in dense_patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"dense_patterns: {pattern!r} is not a string; each entry is a regular "
                             f"expression matched against parameter names ({example})")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"dense_patterns: {pattern!r} is not a valid regular expression ({err}); "
                             f"escape special characters such as . ( [ with a backslash") from None
    return compiled


def lowrank_param_groups(
    model: nn.Module,
    dense_patterns: Iterable[str] = (),
    **lowrank_options,
) -> list[dict]:
    """Two named parameter groups: low-rank matrices, and everything kept dense.

    Dense: embeddings, the LM head (found by module type, ``get_output_embeddings()`` or
    :data:`DEFAULT_DENSE_PATTERNS`), every parameter whose name matches a regular expression
    of ``dense_patterns``, and every parameter that is not 2-D.  ``lowrank_options`` (e.g.
    ``rank=256``) go into the low-rank group only.  Frozen parameters are left out.
    """
    patterns = [re.compile(p) for p in DEFAULT_DENSE_PATTERNS] + _compile(dense_patterns)
    embeddings = _embedding_params(model)
    lowrank, dense = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        keep_dense = p.dim() != 2 or id(p) in embeddings or any(pt.search(name) for pt in patterns)
        (dense if keep_dense else lowrank).append((name, p))
    groups = []
    if lowrank:
        groups.append({"params": lowrank, "lowrank": True, **lowrank_options})
    if dense:
        groups.append({"params": dense, "lowrank": False})
    if not groups:
        raise ValueError("lowrank_param_groups: the model has no trainable parameters")
    return groups

