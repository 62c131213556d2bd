"""The stale-while-revalidate cache.

* ``cache``        - :class:`~parallelkit.SWRCache`: the options, ``get``, ``cached``,
  ``set`` / ``invalidate`` / ``clear``, ``bind``, the lifecycle, ``statistics()``.
* ``front``        - the hit path's state, read by ``get`` and every decorated function.
* ``cached``       - ``@cache.cached``: the generated function per decorated function.
* ``loads``        - everything after a missed fresh hit: stale hits and their refresh,
  misses, loads, failures remembered (bounded), store writes.
* ``singleflight`` - one load per key shared by every caller.
* ``writes``       - store writes ordered per key (an invalidation always wins).
* ``store``        - the :class:`~parallelkit.Store` protocol, its optional
  capabilities and ``MemoryStore``.
* ``stats``        - :class:`~parallelkit.CacheStats`.
"""
