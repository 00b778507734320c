"""Named phases of an optimizer step, visible to ``torch.profiler``.

``with phase("moments"):`` marks a range ``ds_lowrank/moments``.  Outside a profiler it is a
no-op context (half a microsecond; a ``record_function`` would cost ~10 µs on CPU even when
nothing records); ``tools/bench_optimizer.py --profile`` sums the time spent in each phase.

Phases nest; a phase's own time excludes the phases inside it.  The names in use:

``checks``          the zero / non-finite gradient test that decides skipping
``dense_adamw``     the AdamW path of the parameters that are not compressed
``pack``            gathering per-parameter gradients and state into batches, and writing back
``accumulator``     LDAdam's ``g + e``
``basis``           a new basis: power iteration, randomized range finder, SVD, sketch
``orthonormalize``  Cholesky-QR of a new basis
``project``         products with the basis (projected gradient, change of basis)
``moments``         the Adam arithmetic in the subspace (or on factors, or compressed)
``error_feedback``  the compression error kept for the next step
``compress``        MicroAdam's block-wise top-k selection
``update``          the weight update and weight decay
``collectives``     the sums over ranks (ZeRO, tensor parallelism)
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd import _profiler_enabled

PREFIX = "ds_lowrank/"


_NOTHING = contextlib.nullcontext()


def phase(name: str):
    """A context manager marking the phase ``name`` of the current step while a profiler runs."""
    if _profiler_enabled():
        return torch.profiler.record_function(PREFIX + name)
    return _NOTHING
