"""The dependency-graph engine that Flow and the Orchestrator both run on.

* ``graph``     - ``Graph`` / ``Node`` / ``Plan``: definition, validation, wiring.
* ``scheduler`` - ``Run``: one execution of a plan (ready queue + workers).
* ``timeline``  - :class:`~parallelkit.Timeline` / :class:`~parallelkit.Span`: what
  ran when, the critical path, text / Mermaid renderings.
"""
