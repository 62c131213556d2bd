"""The stale-while-revalidate cache.

* ``cache``        - :class:`~parallelkit.SWRCache`: hits, stale hits, misses, the
  background refresh, invalidation.
* ``cached``       - the ``@cache.cached`` decorator and its key builder.
* ``singleflight`` - one load per key shared by every caller.
* ``store``        - the :class:`~parallelkit.Store` protocol and ``MemoryStore``.
* ``stats``        - :class:`~parallelkit.CacheStats`.
"""
