"""Request batching: :class:`~parallelkit.BatchLoader` (``loader``) and one batch (``batch``)."""
