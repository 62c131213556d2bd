"""The dependency-graph engine that Flow and the Orchestrator both run on.

* ``graph``     - ``Graph`` / ``Node`` / ``Plan``: definition, validation, wiring.
* ``scheduler`` - ``Run``: one execution of a plan: a ready queue feeding the one
  worker pool (:mod:`parallelkit._fanout.pool`).
* ``timeline``  - :class:`~parallelkit.Timeline` / :class:`~parallelkit.Span`: what
  ran when, the critical path, text / Mermaid renderings.
"""
