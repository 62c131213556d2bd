"""What every idea uses: argument checks, the Limiter, Retry, Outcome, errors, ownership.

* ``check``    - the one argument checker (counts, durations, rates, flags, choices,
  callables): ``TypeError`` for a type, ``ValueError`` for a value, one wording.
* ``errors``   - the one documented exception tree (``ParallelkitError`` and below).
* ``limiter``  - :class:`~parallelkit.Limiter`: concurrency + start rate, shareable.
* ``retry``    - :class:`~parallelkit.Retry` and the one adapter onto tenacity.
* ``outcome``  - :class:`~parallelkit.Outcome`, what settle mode returns.
* ``owned``    - how an object owns a task group (``async with cache:`` ...).
* ``public``   - ``export(globals())``: public names show their public ``__module__``.
* ``waits``    - which tasks wait for another task's work (a cache load), so that
  a limiter holding slots per task can lend a waiter's slot to that work.
* ``instrument`` - the instrumentation hook (``None`` unless ``parallelkit.otel``
  is instrumenting): read once per call by the primitives it traces.
"""
