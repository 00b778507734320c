"""Telling the user when a ds_lowrank optimizer they built is not the one training its parameters.

HF ``Trainer`` with a DeepSpeed config drops ``optimizers=(LDAdam(...), None)``:
``deepspeed_init`` sets ``trainer.optimizer = None`` and hands DeepSpeed the AdamW of
``create_optimizer()`` (or the config's optimizer).  No code of ds_lowrank runs after that, and
the instance is usually garbage-collected at that very line, before anything is trained.  So
each optimizer watches its own parameters until its first step, from a hook run after a
parameter's gradient is accumulated (removed at that step, so it costs nothing afterwards).
Training by something else shows in a backward pass while the optimizer has not stepped (or no
longer exists):

- the parameter is one DeepSpeed took over (``zero_layout.deepspeed_managed``) while the
  optimizer's groups still hold it, i.e. DeepSpeed was not given this optimizer (a ZeRO or
  ``BF16_Optimizer`` wrapper of it swaps its groups for flat partitions before any backward);
- or the parameter changed between two backward passes (its in-place version counter, or a
  sample of its values): someone stepped it.  Gradient accumulation does not change
  parameters, so it stays silent.

Then one warning names the optimizer, the parameters and the fixes, unless another live
ds_lowrank optimizer was built over the same parameters (the user rebuilt it, or a config
built it), which is training them.  Nothing is patched: the hooks sit on the parameters the
optimizer was given, and a step or the warning removes them.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from ..distributed.zero_layout import deepspeed_managed

# every live ds_lowrank optimizer -> its groups as built: which of them were built over a parameter
_built: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list]" = weakref.WeakKeyDictionary()


def watch_until_first_step(optimizer: torch.optim.Optimizer, originals: list[list[tuple[str, torch.Tensor]]]) -> None:
    """Watch ``optimizer``'s parameters (``originals``: per group, ``(label, parameter)`` as
    built, the optimizer's own list) until its first step; see the module's docstring."""
    _built[optimizer] = originals
    _Watch(optimizer, originals)


class _Watch:
    """The hooks of one optimizer.  It holds the optimizer weakly, so that dropping it still
    frees it; the parameters' hooks hold the watch."""

    def __init__(self, optimizer, originals):
        self.owner = weakref.ref(optimizer)
        self.name = type(optimizer).__name__
        self.count = sum(len(group) for group in originals)
        # id(parameter) -> (group, index, label): where the optimizer's groups hold it until a wrapper swaps them
        self.where: dict[int, tuple[int, int, str]] = {}
        # id(parameter) -> (version counter, sample of its values) at its last backward pass
        self.seen: dict[int, tuple[int, torch.Tensor | None]] = {}
        self.handles: list = []
        self.done = False
        self.finalizer = weakref.finalize(optimizer, self._dropped)
        self.dropped = False
        self.step_handle = optimizer.register_step_pre_hook(self._stepped)
        for gi, group in enumerate(originals):
            for i, (label, p) in enumerate(group):
                if p.requires_grad and p.is_leaf:
                    self.where[id(p)] = (gi, i, label)
                    self.handles.append(p.register_post_accumulate_grad_hook(self._seen))

    def _dropped(self) -> None:
        self.dropped = True

    def _stepped(self, optimizer, args, kwargs) -> None:
        # torch is iterating over the step hooks: this one stays, a no-op from now on
        self.retire(keep_step_hook=True)

    def retire(self, keep_step_hook: bool = False) -> None:
        if self.done:
            return
        self.done = True
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.finalizer.detach()
        if not keep_step_hook:
            self.step_handle.remove()

    def _seen(self, p: torch.Tensor) -> None:
        if self.done:
            return
        gi, i, label = self.where[id(p)]
        optimizer = self.owner()
        if optimizer is not None:
            groups = optimizer.param_groups
            if not (gi < len(groups) and i < len(groups[gi]["params"]) and groups[gi]["params"][i] is p):
                return self.retire()        # a wrapper (ZeRO, BF16_Optimizer) took it over and steps it
        now, before = (p._version, _sample(p)), self.seen.get(id(p))
        self.seen[id(p)] = now
        if deepspeed_managed(p):
            evidence = "DeepSpeed trains them"
        elif before is not None and _changed(before, now):
            evidence = "they changed between backward passes"
        else:
            return
        rebuilt = any(other is not optimizer and any(q is p for group in originals for _, q in group)
                      for other, originals in list(_built.items()))
        self.retire()
        if not rebuilt:
            warnings.warn(self._message(label, evidence), UserWarning, stacklevel=2)

    def _message(self, label: str, evidence: str) -> str:
        state = "was discarded before its first step" if self.dropped else "has not taken a step"
        return (f"the {self.name} built over {self.count} parameters ({label}, ...) {state}, and {evidence}: "
                f"another optimizer is training them. HF Trainer drops optimizers=({self.name}(...), None) when "
                f"DeepSpeed is on and trains an AdamW of its own: use ds_lowrank.integration.hf.LowRankTrainer "
                f"(it keeps the instance), or name the optimizer in the DeepSpeed config (\"optimizer\": "
                f"{{\"type\": \"{self.name}\", ...}}) after ds_lowrank.register_deepspeed_optimizers(). Elsewhere, "
                f"step this optimizer, or do not build it")


def _sample(p: torch.Tensor) -> torch.Tensor | None:
    """A few of ``p``'s values as bytes (NaN compares equal to itself), or ``None`` for a tensor
    subclass (a DTensor's values are spread over ranks).  The version counter alone misses
    fused optimizers: torch's ``fused=True`` AdamW updates parameters without counting it."""
    if type(p.data) is not torch.Tensor:
        return None
    flat = p.detach().reshape(-1)
    return flat[::max(1, flat.numel() // 16)].clone().view(torch.uint8)


def _changed(before: tuple, now: tuple) -> bool:
    if before[0] != now[0]:
        return True
    return before[1] is not None and now[1] is not None and not torch.equal(before[1], now[1])
