"""Parameter groups for a model: which weights are low-rank and which stay dense."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

from torch import nn

# Names that mark the LM head (HF Llama: "lm_head"; GPT-2: tied to "wte"; Megatron: "output_layer").
DEFAULT_DENSE_PATTERNS = (r"(^|\.)lm_head\.", r"(^|\.)output_layer\.", r"(^|\.)embed_out\.")
# Module classes that are embeddings without subclassing nn.Embedding (megatron-core's vocabulary-
# parallel embedding; matched by name so megatron-core need not be importable)
EMBEDDING_CLASS_NAMES = ("VocabParallelEmbedding",)
# What a wrapper keeps its model in: DeepSpeed's engine, DDP, FSDP, torch.compile
WRAPPER_ATTRIBUTES = ("module", "_orig_mod")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DeepSpeed's engine, DDP and torch.compile wrappers (names then match the
    model's own: ``model.embed_tokens.weight``, not ``module.model.embed_tokens.weight``): a module
    whose ``module`` (or ``_orig_mod``) holds every one of its parameters."""
    while True:
        inner = next((getattr(model, a) for a in WRAPPER_ATTRIBUTES
                      if isinstance(getattr(model, a, None), nn.Module)), None)
        if inner is None or inner is model:
            return model
        if {id(p) for p in model.parameters()} != {id(p) for p in inner.parameters()}:
            return model
        model = inner


def _is_embedding_module(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or any(
        cls.__name__ in EMBEDDING_CLASS_NAMES for cls in type(module).__mro__)


def embedding_parameters(model: nn.Module) -> dict[int, str]:
    """id -> name of every embedding and output-layer parameter of ``model``: ``nn.Embedding``
    and megatron-core's ``VocabParallelEmbedding`` modules, HF's ``get_input_embeddings()`` and
    ``get_output_embeddings()`` (tied weights are one parameter), and the parameters named by
    :data:`DEFAULT_DENSE_PATTERNS` (Llama's ``lm_head``, megatron-core's ``output_layer``)."""
    model = unwrap(model)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    ids = {id(p) for m in model.modules() if _is_embedding_module(m) for p in m.parameters()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            module = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Module):
            ids.update(id(p) for p in module.parameters())
    patterns = [re.compile(p) for p in DEFAULT_DENSE_PATTERNS]
    ids.update(i for i, n in names.items() if any(pt.search(n) for pt in patterns))
    return {i: names.get(i, "?") for i in ids}


def _whole_shape(p) -> tuple[int, ...]:
    """A parameter's shape, also when ZeRO-3 has partitioned it (``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def _targeted(target_modules, module_name: str) -> bool:
    """Whether a module name is selected by ``target_modules``, read as transformers reads
    ``optim_target_modules``: one string is a regular expression the whole name must match; a
    list selects a name equal to, containing, or fully matching (as a regular expression) an entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(t == module_name or t in module_name or re.fullmatch(t, module_name) is not None
               for t in target_modules)


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


def mark_fused_qkv(model: nn.Module, dense_patterns: Iterable[re.Pattern] = ()) -> list[str]:
    """Declare the layout of megatron-core's fused QKV weights (``linear_qkv`` of its attention
    modules, whose ``config`` has the head counts): sets ``fused_qkv = (num_attention_heads,
    num_query_groups, kv_channels)`` on each weight that has none, so that the optimizers step
    its query, key and value blocks as separate matrices (``ds_lowrank.distributed.fused``).
    Weights whose names match one of ``dense_patterns`` (compiled) are left alone.  Returns the
    names of the weights marked or already marked."""
    from .distributed.fused import QKV_ATTRIBUTE

    names = {id(p): n for n, p in model.named_parameters()}
    found = []
    for module_name, module in model.named_modules():
        qkv, config = getattr(module, "linear_qkv", None), getattr(module, "config", None)
        weight = getattr(qkv, "weight", None)
        if not isinstance(weight, nn.Parameter) or not all(
                isinstance(getattr(config, k, None), int) for k in ("num_attention_heads", "kv_channels")):
            continue
        name = names.get(id(weight), f"{module_name}.linear_qkv.weight")
        if any(pt.search(name) for pt in dense_patterns):
            continue
        if getattr(config, "attention_output_gate", False):
            raise ValueError(f"{name}: attention_output_gate adds gate rows to the fused QKV "
                             f"weight, a layout the optimizers do not split; keep it dense with "
                             f"dense_patterns=[r\"linear_qkv\\.\"]")
        if getattr(weight, QKV_ATTRIBUTE, None) is None:
            groups = getattr(config, "num_query_groups", None) or config.num_attention_heads
            setattr(weight, QKV_ATTRIBUTE, (config.num_attention_heads, groups, config.kv_channels))
        found.append(name)
    return found


def lowrank_param_groups(
    model: nn.Module,
    dense_patterns: Iterable[str] = (),
    target_modules: str | Iterable[str] | None = None,
    **lowrank_options,
) -> list[dict]:
    r"""Two named parameter groups: low-rank matrices, and everything kept dense.

    Dense: embeddings and the LM head (see :func:`embedding_parameters`: ``nn.Embedding``,
    megatron-core's ``VocabParallelEmbedding`` and ``output_layer``, HF's input and output
    embeddings, tied or not), every parameter whose name matches a regular expression of
    ``dense_patterns``, and every parameter that is not 2-D.  ``target_modules`` (as transformers'
    ``optim_target_modules``: e.g. ``["attn", "mlp"]``, ``r".*\.(q|v)_proj"`` or ``"all-linear"``) keeps dense every
    parameter of a module it does not select; embeddings stay dense even if selected.
    ``lowrank_options`` (e.g. ``rank=256``) go into the low-rank group only.  Frozen parameters
    are left out.  A model wrapped by DeepSpeed's engine, DDP or ``torch.compile`` is unwrapped.
    megatron-core's fused QKV weights are marked with their layout (:func:`mark_fused_qkv`).
    """
    model = unwrap(model)
    patterns = _compile(dense_patterns)
    mark_fused_qkv(model, patterns)
    if target_modules is not None:
        if isinstance(target_modules, bytes) or not isinstance(target_modules, (str, Iterable)):
            raise ValueError(f"target_modules={target_modules!r}: expected a regular expression or a list "
                             f"of module names such as [\"attn\", \"mlp\"]")
        target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        if isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear":
            chosen = [m for m in model.modules() if isinstance(m, nn.Linear)]
        else:
            chosen = [m for mn, m in model.named_modules() if _targeted(target_modules, mn)]
        selected = {id(p) for m in chosen for p in m.parameters(recurse=False)}
    embeddings = embedding_parameters(model)
    lowrank, dense = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        keep_dense = (len(_whole_shape(p)) != 2 or id(p) in embeddings
                      or any(pt.search(name) for pt in patterns)
                      or (target_modules is not None and id(p) not in selected))
        (dense if keep_dense else lowrank).append((name, p))
    if target_modules is not None and not lowrank:
        raise ValueError(f"target_modules={target_modules!r} selects no matrix of the model: module names "
                         f"look like {[n for n, _ in list(model.named_modules())[1:4]]}")
    groups = []
    if lowrank:
        groups.append({"params": lowrank, "compress": True, **lowrank_options})
    if dense:
        groups.append({"params": dense, "compress": False})
    if not groups:
        raise ValueError("lowrank_param_groups: the model has no trainable parameters")
    return groups


# -- embeddings made low-rank by other routes ------------------------------------------------

_warned: set[tuple] = set()


def warn_lowrank_embeddings_of_caller(optimizer, depth: int = 8) -> None:
    """For an optimizer built over bare parameters (no names: ``LDAdam(model.parameters())``, HF
    Trainer's ``optimizer_cls_and_kwargs``), which cannot tell an embedding from a matrix: the code
    that built it usually holds the model in a variable (Trainer's ``create_optimizer`` as
    ``opt_model``, a script as ``model``).  The largest module among the ``depth`` calling frames'
    variables that holds its parameters is taken as the model, and ``warn_lowrank_embeddings``
    tells the user if embeddings would be compressed.  Reads variables only; finds nothing, and
    says nothing, where no caller holds the model."""
    if any(group.get("param_names") is not None for group in optimizer.param_groups):
        return
    mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frame, best, seen = sys._getframe(1), None, set()
    for _ in range(depth):
        if frame is None:
            break
        for value in list(frame.f_locals.values()):
            if isinstance(value, nn.Module) and id(value) not in seen:
                seen.add(id(value))
                count = sum(1 for p in value.parameters() if id(p) in mine)
                if count and (best is None or count > best[0]):
                    best = (count, value)
        frame = frame.f_back
    if best is not None:
        warn_lowrank_embeddings(optimizer, best[1], f"built over {type(best[1]).__name__}.parameters() "
                                                    f"without names")


def lowrank_embeddings(optimizer, model: nn.Module) -> list[str]:
    """Names of ``model``'s embedding and output-layer parameters that ``optimizer`` (a ds_lowrank
    optimizer) would compress, e.g. when built over ``model.parameters()``."""
    is_compressed = getattr(type(optimizer), "is_compressed_shape", None)
    if is_compressed is None:
        return []
    embeddings = embedding_parameters(model)
    # the parameters as constructed: a ZeRO wrapper swaps the groups' tensors for flat partitions
    originals = getattr(optimizer, "originals", None)
    found = []
    for gi, group in enumerate(optimizer.param_groups):
        if originals is not None:
            params = [p for _, p in originals(group, gi)]
        else:
            params = group["params"]
        for p in params:
            if id(p) in embeddings and is_compressed(group, _whole_shape(p)):
                found.append(embeddings[id(p)])
    return found


def warn_lowrank_embeddings(optimizer, model: nn.Module, route: str = "") -> list[str]:
    """Warn once per optimizer class and parameter names if ``optimizer`` compresses an embedding
    or output layer of ``model``; returns their names."""
    import warnings

    names = lowrank_embeddings(optimizer, model)
    key = (type(optimizer).__name__, tuple(names))
    if names and key not in _warned:
        _warned.add(key)
        how = f" ({route})" if route else ""
        warnings.warn(
            f"{type(optimizer).__name__} compresses the embedding/output-layer parameters {names}{how}: "
            f"their gradients are row-sparse and the low-rank update serves them badly. Build the "
            f"optimizer over ds_lowrank.lowrank_param_groups(model, rank=...) (or pass the DeepSpeed "
            f'config route "optimizer": {{"type": "{type(optimizer).__name__}", ...}}, which does), or '
            f'put them in a group with "compress": False.', UserWarning, stacklevel=3)
    return names
