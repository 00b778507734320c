"""Precision of the large products of a step: those with an ``m × n`` operand (the power
iteration's ``Aᵀ·P`` and ``A·Z``, the projection ``Pᵀ·A``).  Their outputs are ``r`` wide, and
the basis, the moments and the error feedback stay in the state's dtype whatever is chosen.

- ``"float32"``: strict IEEE float32 products;
- ``"tf32"``: on a CUDA device, float32 products on the tensor cores' TF32 (10-bit mantissa
  inputs, float32 accumulation), for the optimizer's step only; elsewhere ``"float32"``;
- ``"bfloat16"``: the ``m × n`` operand cast to bfloat16 once per step and the products taken in
  bfloat16 (float32 accumulation inside the GEMM), their results back in float32;
- ``"auto"``: ``"tf32"`` on CUDA, ``"float32"`` elsewhere (see the README's measurements).

A float64 state keeps float64 products whatever the setting.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "float32", "tf32", "bfloat16")


def resolve(precision: str, device: torch.device) -> str:
    """The setting ``"auto"`` stands for on ``device``."""
    if precision == "auto":
        return "tf32" if device.type == "cuda" else "float32"
    return precision


def operand_dtype(precision: str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the ``m × n`` operand is cast to for the products, or ``None`` to keep it."""
    return torch.bfloat16 if precision == "bfloat16" and dtype == torch.float32 else None


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device):
    """TF32 float32 products on ``device`` inside the block when ``precision`` is ``"tf32"``; the
    process-wide setting is restored afterwards."""
    if precision != "tf32" or device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def mixed_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` in the narrower dtype of the two, the result in the wider one."""
    if x.dtype == y.dtype:
        return x @ y
    narrow = x.dtype if x.element_size() < y.element_size() else y.dtype
    wide = torch.promote_types(x.dtype, y.dtype)
    return (x.to(narrow) @ y.to(narrow)).to(wide)
