"""Pure tensor functions through ``torch.compile``, with the eager function as the fallback.

``Compiled(fn)`` is ``torch.compile(fn, dynamic=False, fullgraph=True)``: one graph per distinct
set of sizes (a parameter's flattening, a ZeRO piece), built at its first step and reused at every
later one, so steps after the first recompile nothing.  Not dynamic shapes: in torch 2.13 the CPU
code generated for size-generic graphs ran several times slower here, and one such graph, reused
for a segment whose length left another remainder modulo the bucket size, wrote wrong values.
Past torch's recompile limit (``torch._dynamo.config.recompile_limit``, 8 by default) further
sizes run eager, with torch's own warning.

``fullgraph``: the whole function is traced and compiled before any of it runs, so a function
that fails to compile has touched none of its (in-place updated) arguments, and the eager
function can take its place.  That happens once, with a warning naming the cause: torch.compile
unavailable on this Python or platform, or a backend that cannot build (no C++ compiler for
inductor on CPU, no Triton on a GPU).  Errors raised by the computation itself propagate.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import torch


# Eager numerics where inductor would otherwise depart from them: eager rounds every bfloat16 /
# float16 intermediate, where inductor keeps fused intermediates in float32 (which moves a value
# across a rounding boundary: a bucket's outward-rounded minimum, a stored window value); Triton
# divides approximately and flushes subnormals unless told not to.  One difference remains on
# CPU: eager's float32 sqrt is not always correctly rounded (1 ulp off at times), inductor's is.
INDUCTOR_OPTIONS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
                    "eager_numerics.disable_ftz": True}


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot run here, or ``None`` if it can try."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        dynamo = importlib.import_module("torch._dynamo")
    except Exception as err:     # an incomplete install: report the import's own message
        return f"torch._dynamo does not import ({err})"
    try:
        supported = dynamo.is_dynamo_supported()
    except Exception as err:
        return str(err)
    return None if supported else "torch.compile does not support this Python or platform"


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "could not compile" rather than "the computation failed"."""
    import torch._dynamo.exc as dynamo_exc

    return (dynamo_exc.BackendCompilerFailed, dynamo_exc.Unsupported, dynamo_exc.InternalTorchDynamoError)


class Compiled:
    """``fn`` compiled on first use, or ``fn`` itself from the first failure to compile on."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.name = getattr(fn, "__qualname__", repr(fn))
        self._compiled: Callable | None = None
        self.fallback_reason: str | None = None

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        warnings.warn(f"torch.compile of {self.name} failed, using the eager PyTorch version instead "
                      f"(same results, slower): {reason}", RuntimeWarning, stacklevel=3)

    def __call__(self, *args, **kwargs):
        if self.fallback_reason is None and self._compiled is None:
            reason = compile_unavailable()
            if reason is None:
                try:
                    self._compiled = torch.compile(self.fn, dynamic=False, fullgraph=True,
                                                   options=INDUCTOR_OPTIONS)
                except Exception as err:     # e.g. an option an older inductor does not know
                    reason = f"{type(err).__name__}: {err}"
            if reason is not None:
                self._fall_back(reason)
        if self.fallback_reason is not None:
            return self.fn(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except _compile_errors() as err:
            # the first line names the cause (e.g. the C++ compiler's complaint); the rest is a trace
            self._fall_back(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
            return self.fn(*args, **kwargs)
