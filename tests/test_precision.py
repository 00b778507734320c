"""The precision of LDAdam's products with the gradient (``proj_precision``)."""

import pytest
import torch

from ds_lowrank import LDAdam
from ds_lowrank.linalg.precision import matmul_precision, mixed_matmul, operand_dtype, resolve


def test_auto_is_tf32_on_cuda_and_float32_elsewhere():
    assert resolve("auto", torch.device("cuda")) == "tf32"
    assert resolve("auto", torch.device("cpu")) == "float32"
    assert resolve("bfloat16", torch.device("cpu")) == "bfloat16"


def test_tf32_is_switched_on_for_the_block_only_and_restored_after_an_error():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with matmul_precision("tf32", torch.device("cuda")):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError):
        with matmul_precision("tf32", torch.device("cuda")):
            raise RuntimeError("a failed step")
    assert matmul.fp32_precision == before
    with matmul_precision("tf32", torch.device("cpu")):      # nothing to switch on a CPU
        assert matmul.fp32_precision == before


def test_mixed_matmul_takes_the_narrow_dtype_and_returns_the_wide_one():
    x, y = torch.randn(5, 7), torch.randn(7, 3)
    out = mixed_matmul(x.bfloat16(), y)
    assert out.dtype == torch.float32
    assert torch.equal(out, (x.bfloat16() @ y.bfloat16()).float())
    assert torch.equal(mixed_matmul(x, y), x @ y)
    assert operand_dtype("bfloat16", torch.float64) is None      # float64 state: exact products


def _train(precision, dtype=torch.float32, steps=6):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
              for shape in ((24, 40), (40, 24), (24, 40))]
    opt = LDAdam([{"params": params, "within_adamw": False}], lr=1e-2, rank=4, proj_precision=precision)
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
    return [p.detach().clone() for p in params], opt


def test_bfloat16_products_move_the_weights_close_to_float32():
    exact, _ = _train("float32")
    low, _ = _train("bfloat16")
    start, _ = _train("float32", steps=0)
    for e, b, s in zip(exact, low, start):
        assert not torch.equal(e, b)              # the option took effect
        # a few per cent of the update at most on these random gradients, where Adam's
        # normalization magnifies small changes in the weakest projected coordinates
        assert (e - b).norm() < 0.1 * (e - s).norm()


def test_float64_state_keeps_exact_products():
    exact, _ = _train("float32", torch.float64)
    low, _ = _train("bfloat16", torch.float64)
    assert all(torch.equal(e, b) for e, b in zip(exact, low))


def test_auto_on_cpu_is_float32():
    exact, _ = _train("float32")
    auto, _ = _train("auto")
    assert all(torch.equal(e, a) for e, a in zip(exact, auto))
