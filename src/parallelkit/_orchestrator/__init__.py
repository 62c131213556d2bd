"""Start-up orchestration: services by dependency graph, readiness, rollback, ordered stop.

* ``orchestrator`` - :class:`~parallelkit.Orchestrator`: declaring services.
* ``definitions``  - the checks of a definition at the door (names, options, graph).
* ``session``      - one start: start-up, rollback, the ordered stop.
* ``starting``     - starting one service's task and waiting until it is ready.
* ``running``      - :class:`~parallelkit.Running` and health: what the user holds.
* ``serving``      - ``serve()``: until a signal, then the graceful stop.
* ``lifetime``     - a service's definition and shapes, as one lifetime.
* ``services``     - hosting one service (readiness, retry, tear-down once).
* ``process``      - :class:`~parallelkit.ManagedProcess`: subprocess services.
"""
