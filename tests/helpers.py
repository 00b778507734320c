"""Small shared helpers for the tests."""

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam, MicroAdam


def full_momentum(state, right):
    """The low-rank momentum back in the weight's space: P·M (left) or M·R (right)."""
    if right:
        return state["proj_exp_avg"] @ state["basis"]
    return state["basis"] @ state["proj_exp_avg"]


def grad_sequence(shape, steps, seed=1, dtype=torch.float64, mean=0.5):
    """Reproducible gradients with a nonzero mean (so the second-moment estimate S goes negative)."""
    gen = torch.Generator().manual_seed(seed)
    return [mean + torch.randn(shape, generator=gen, dtype=dtype) for _ in range(steps)]


def run_steps(opt, params, grads_per_step):
    """Feed given gradients to ``params`` and step, once per entry of ``grads_per_step``."""
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()


def roundtrip(obj):
    """torch.save then torch.load(weights_only=True), through memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def tiny_mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 12), torch.nn.Tanh(), torch.nn.Linear(12, 40), torch.nn.Tanh(),
        torch.nn.Linear(40, 12, bias=False), torch.nn.Tanh(), torch.nn.Linear(12, 5),
    ).to(dtype)


def mlp_batches(steps, dtype=torch.float32, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 24, generator=gen).to(dtype), torch.randn(32, 5, generator=gen).to(dtype))
            for _ in range(steps)]


def train(model, opt, batches, scheduler=None):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


# Factories with hyperparameters sized for small matrices such as tiny_mlp's (12×24 … 5×12):
# ranks below every dimension, a rank evaluation, basis refresh or window wrap every few
# steps, and MicroAdam blocks and buckets smaller than one layer.


# At these ranks some of these small matrices would cost more than AdamW compressed, and the
# optimizers would keep them dense (within_adamw, see ds_lowrank.optim.base); the factories turn
# that off so that every matrix takes the compressed path the tests are about.


def full_size(params) -> list[dict]:
    """``params`` (parameters, named parameters or groups) as groups with ``within_adamw=False``."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return [{"within_adamw": False, **g} for g in params]
    return [{"params": params, "within_adamw": False}]


def make_ldadam(params, **kw):
    return LDAdam(full_size(params), **{"rank": 4, **kw})


def make_galore(params, **kw):
    return GaLoreAdamW(full_size(params), **{"rank": 3, "update_proj_gap": 3, **kw})


def make_adapprox(params, **kw):
    return Adapprox(full_size(params), **{"rank_max": 4, "rank_interval": 2, **kw})


MICROADAM_SMALL = dict(window=4, density=0.25, block_size=16, bucket_size=8)


def make_microadam(params, **kw):
    return MicroAdam(full_size(params), **{**MICROADAM_SMALL, **kw})


def snapshot(opt):
    """A copy of every state tensor, by parameter."""
    return {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}


def assert_same_state(a, b):
    """Two snapshots (or optimizer states), parameter by parameter in order, hold the same keys
    and bitwise-equal tensors of the same dtype.  In order rather than by parameter, so that
    two replicas' optimizers can be compared."""
    assert len(a) == len(b)
    for sa, sb in zip(a.values(), b.values()):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def assert_bad_group_refused(make, kw, key):
    """``make(params)`` refuses the group keys ``kw`` with a message naming ``key``: when the
    group is built, and when it is changed after construction (checked at the next step)."""
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=rf"invalid {key}=.*expected"):
        make([{"params": [p], **kw}])
    opt = make([p])
    opt.param_groups[0].update(kw)
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=rf"invalid {key}="):
        opt.step()


def assert_change_refused(opt, p, change, match):
    """After one step of ``opt`` on ``p``, setting the group keys ``change`` is refused at the
    next step with a message matching ``match``; the group is then put back."""
    if not opt.state.get(p):
        run_steps(opt, [p], [[torch.randn_like(p)]])
    saved = {k: opt.param_groups[0][k] for k in change}
    opt.param_groups[0].update(change)
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=match):
        opt.step()
    opt.param_groups[0].update(saved)


def load_script(path, name):
    """A script of the repository (launch/, tools/) imported as a module, to call its functions."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A gradient confined to a few rows of its matrix (the others dead units): rank 4, below the
# optimizers' rank, so the power iteration's block is rank-deficient.
DEFICIENT_SHAPE, DEFICIENT_ROWS = (48, 64), (3, 17, 30, 41)


def deficient_gradients(steps, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        g = torch.zeros(DEFICIENT_SHAPE, dtype=torch.float64)
        g[list(DEFICIENT_ROWS)] = torch.randn(len(DEFICIENT_ROWS), DEFICIENT_SHAPE[1], generator=gen,
                                              dtype=torch.float64)
        out.append(g.to(dtype))
    return out


def outside_rows_fraction(make, dtype, steps=10):
    """The largest fraction (Frobenius norm) of a step's update that lands outside the rows the
    gradients live in, over ``steps`` steps of ``make([("w", p)])``."""
    p = torch.nn.Parameter(torch.randn(DEFICIENT_SHAPE, generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64).to(dtype))
    opt = make([("w", p)])
    outside = torch.ones(DEFICIENT_SHAPE[0], dtype=torch.bool)
    outside[list(DEFICIENT_ROWS)] = False
    worst = 0.0
    for g in deficient_gradients(steps, dtype):
        before = p.detach().clone()
        run_steps(opt, [p], [[g]])
        delta = (p.detach() - before).double()
        assert delta.norm() > 0
        worst = max(worst, float(delta[outside].norm() / delta.norm()))
    return worst


def free_port() -> int:
    """A port no one listens on now: every launch names its own, never torchrun's default."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GLOO_ABORT = "terminate called without an active exception"


def torchrun(world: int, worker: str, out, *args, env: dict | None = None, timeout: int = 900,
             cwd=None) -> dict:
    """Launch ``worker OUT ARGS...`` on ``world`` CPU ranks over gloo (one thread each) and return
    the JSON it wrote to ``out``; a launch that fails or hangs past ``timeout`` fails the test
    with the end of its output.  ``env``: variables to set, or with None to unset."""
    env = {k: v for k, v in dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env or {})).items()
           if v is not None}

    def launch():
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={free_port()}", str(worker), str(out), *map(str, args)]
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    proc = launch()
    if proc.returncode != 0 and GLOO_ABORT in proc.stderr + proc.stdout:
        # gloo's C++ threads can abort a rank (std::terminate, not a Python error) on a loaded
        # machine; this was seen once in a thousand launches and never twice in a row.  One
        # more launch tells that apart from an abort our code causes, which repeats.
        proc = launch()
    if proc.returncode != 0 or not os.path.exists(out):
        raise AssertionError(f"{os.path.basename(str(worker))} on {world} ranks failed:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(Path(out).read_text())
