"""Adam's moments of a projection optimizer's state (``optim.adam_subspace`` is the math), for
the checkpoints written for AdamW."""

from __future__ import annotations

import torch

from ..optim.adam_subspace import subspace_to_adam
from ..optim.ldadam import dense_error


def adam_of_subspace(cls, group: dict, shape: tuple[int, ...], state: dict) -> dict[str, torch.Tensor]:
    """Adam's ``exp_avg``, ``exp_avg_sq`` (in the weight's layout) and ``step`` of a matrix of
    whole ``shape`` from the whole state a projection optimizer ``cls`` keeps of it with the
    group's settings ``group`` (``subspace_to_adam``, oriented as ``cls`` projects)."""
    if "basis" not in state:
        raise ValueError("it has no counterpart in Adam's; only LDAdam's and GaLore's convert")
    right = cls.projects_right(group, shape)

    def oriented(t):
        return None if t is None else (t.mT if right else t)
    step = int(state["step"])
    m, v = subspace_to_adam(oriented(state["basis"]), oriented(state["proj_exp_avg"]),
                            oriented(state["proj_exp_avg_sq"]), oriented(dense_error(state)), step, group["betas"])
    return {"exp_avg": oriented(m).contiguous(), "exp_avg_sq": oriented(v).contiguous(),
            "step": torch.tensor(float(step))}
