"""Distribution of the optimizers' math: the reducer interface and its implementations."""

from .reducer import LocalReducer, Reducer

__all__ = ["LocalReducer", "Reducer"]
