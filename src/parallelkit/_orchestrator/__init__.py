"""Start-up orchestration: services by dependency graph, readiness, rollback, ordered stop.

* ``orchestrator`` - :class:`~parallelkit.Orchestrator`: declaring services.
* ``running``      - one start: the session, :class:`~parallelkit.Running`, health,
  the ordered stop.
* ``services``     - hosting one service (its generator, readiness, teardown).
* ``process``      - :class:`~parallelkit.ManagedProcess`: subprocess services.
"""
