"""parallelkit's benchmark suite: ``python -m benchmarks [NAME ...] [--full]`` (``--help``)."""
