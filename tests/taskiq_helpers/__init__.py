"""Worker-side code for the parallelkit.taskiq tests, docs recipe and fixtures.

The tests start real ``taskiq worker`` processes on these modules from the
repository root, so module names (and exception types) are the same,
``tests.taskiq_helpers.*``, in the workers and in the test process.
"""
