"""Bounded fan-out: ``gather``, ``map`` and ``imap``, on the one worker pool.

* ``pool``    - :class:`~.pool.Pool`: how every fan-out (and the graph engine of
  ``Flow`` and the Orchestrator, and the Taskiq ``map``) starts and runs workers:
  workers take units from a source, start as work arrives, up to a maximum;
  fail-fast or settle.
* ``options`` - the one option builder (``limit``, ``rate``, ``timeout``, ``retry``
  become the per-item call, also for ``Flow.step``) and the one limit → workers rule.
* ``fanout``  - ``gather`` and ``map``; ``imap`` streams the same work from an
  ``async with`` block.
"""
