"""Kernels and the dispatch table that chooses between them (see :mod:`.dispatch`)."""

from .dispatch import AUTO_ORDER, BACKENDS, backend_table, candidates, select_backend

__all__ = ["AUTO_ORDER", "BACKENDS", "backend_table", "candidates", "select_backend"]
