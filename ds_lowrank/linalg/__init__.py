"""Batched linear algebra written against a reducer, as steps that post their sums (see
``ds_lowrank.distributed.reducer``; in one process ``run_local(orthonormalize(Y))``)."""

from .magnitude import gradient_flags
from .orthonormalize import add_product_, orthonormalize
from .subspace import exact_top_subspace, randomized_top_subspace, range_finder, top_singular_vectors

__all__ = ["add_product_", "gradient_flags", "orthonormalize", "exact_top_subspace", "randomized_top_subspace",
           "range_finder", "top_singular_vectors"]
