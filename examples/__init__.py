"""Runnable examples for parallelkit (importable as the ``examples`` package)."""
