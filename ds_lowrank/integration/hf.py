"""Hugging Face ``transformers.Trainer`` with a ds_lowrank optimizer, with or without DeepSpeed.

``Trainer`` has two ways of taking an optimizer, and under DeepSpeed it drops both:
``optimizers=(LDAdam(...), None)`` is set to ``None`` in ``deepspeed_init`` and replaced by the
optimizer of ``create_optimizer()`` (AdamW by default), and ``optimizer_cls_and_kwargs`` builds
the optimizer over every parameter, embeddings included.  :class:`LowRankTrainer` builds (or
keeps) the ds_lowrank optimizer in ``create_optimizer``, which is the one DeepSpeed is given;
with an ``"optimizer"`` section in the DeepSpeed config instead, it registers the type names
(:func:`ds_lowrank.register_deepspeed_optimizers`) so the config builds it.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from ..optim.base import CompressedOptimizer
from ..param_groups import lowrank_param_groups, warn_lowrank_embeddings
from .deepspeed import register_deepspeed_optimizers
from .deepspeed_config import OPTIMIZERS

# keys of optimizer_kwargs that choose the groups (lowrank_param_groups) rather than the optimizer
GROUP_KEYS = ("dense_patterns", "target_modules")


def lowrank_optimizer(model, args, optimizer_cls: type | str = "LDAdam", decay_parameter_names=None,
                      **optimizer_kwargs) -> CompressedOptimizer:
    """A ds_lowrank optimizer for ``model`` with a Trainer's ``args``: ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` from ``TrainingArguments`` unless given; groups from
    :func:`lowrank_param_groups` (``target_modules`` defaults to ``args.optim_target_modules``,
    ``dense_patterns`` as there); no weight decay on the parameters not in
    ``decay_parameter_names`` (the Trainer's own rule: biases and norms), as Trainer does."""
    if isinstance(optimizer_cls, str):
        if optimizer_cls.lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer_cls!r}: use one of "
                             f"{sorted({c.__name__ for c in OPTIMIZERS.values()})}")
        optimizer_cls = OPTIMIZERS[optimizer_cls.lower()]
    grouping = {k: optimizer_kwargs.pop(k) for k in GROUP_KEYS if k in optimizer_kwargs}
    grouping.setdefault("target_modules", getattr(args, "optim_target_modules", None))
    options = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
               "weight_decay": args.weight_decay, **optimizer_kwargs}
    groups = lowrank_param_groups(model, **grouping)
    if decay_parameter_names is not None and options["weight_decay"]:
        decay = set(decay_parameter_names)
        split = []
        for group in groups:
            for wanted in (True, False):
                params = [(n, p) for n, p in group["params"] if (n in decay) == wanted]
                if params:
                    split.append({**group, "params": params, **({} if wanted else {"weight_decay": 0.0})})
        groups = split
    return optimizer_cls(groups, **options)


class LowRankTrainer(Trainer):
    """``transformers.Trainer`` whose optimizer is a ds_lowrank one, with or without DeepSpeed.

    - ``optimizer_cls`` (``"LDAdam"``, ``"GaLoreAdamW"``, ``"Adapprox"``, ``"MicroAdam"`` or the
      class) and ``optimizer_kwargs`` (e.g. ``{"rank": 256, "target_modules": ["attn", "mlp"]}``):
      built in ``create_optimizer`` by :func:`lowrank_optimizer`, embeddings and LM head dense;
    - or ``optimizers=(LDAdam(...), None)``: that instance is kept under DeepSpeed too;
    - or, with DeepSpeed, ``"optimizer": {"type": "LDAdam", "params": {"lr": "auto", ...}}`` in the
      config: the type names are registered and the config builds it (``"auto"`` filled by the
      Trainer from its arguments).

    Checkpoints and resuming are Trainer's own (``save_steps``, ``resume_from_checkpoint``).
    """

    def __init__(self, *args, optimizer_cls: type | str | None = None,
                 optimizer_kwargs: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._lowrank_cls = optimizer_cls if optimizer_cls is not None else (
            None if isinstance(self.optimizer, CompressedOptimizer) else "LDAdam")
        self._lowrank_kwargs = dict(optimizer_kwargs or {})
        self._kept_optimizer = self.optimizer if isinstance(self.optimizer, CompressedOptimizer) else None
        if self._kept_optimizer is not None and optimizer_cls is not None:
            raise ValueError("LowRankTrainer: pass optimizer_cls or optimizers=(optimizer, ...), not both")
        if self.is_deepspeed_enabled:
            config = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
            section = config.get("optimizer")
            if section is not None:
                kind = str(section.get("type", ""))
                if kind.lower() in OPTIMIZERS:
                    register_deepspeed_optimizers()
                given = self._kept_optimizer is not None or optimizer_cls is not None
                if given or kind.lower() not in OPTIMIZERS:
                    raise ValueError(
                        f'the DeepSpeed config has an "optimizer" section of type {kind!r}, which Trainer '
                        f"builds instead of the optimizer passed to LowRankTrainer: remove that section "
                        f"(the Trainer's optimizer is then given to DeepSpeed), or remove the optimizer "
                        f"argument and name a ds_lowrank type in the config")

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            if self._kept_optimizer is not None:
                self.optimizer = self._kept_optimizer
            else:
                self.optimizer = lowrank_optimizer(opt_model, self.args, self._lowrank_cls,
                                                   self.get_decay_parameter_names(opt_model),
                                                   **self._lowrank_kwargs)
            warn_lowrank_embeddings(self.optimizer, opt_model, "the optimizer given to LowRankTrainer")
        return self.optimizer
