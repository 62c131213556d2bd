"""An exception type the producer has not imported when a worker raises it.

``tasks.py`` imports this module only inside the task that raises it, so the test
process first sees it when ``parallelkit.taskiq`` rebuilds the original type.
"""

from __future__ import annotations


class CompanyNotFound(LookupError):
    """A company id that does not exist."""

    def __init__(self, company_id: int) -> None:
        super().__init__(company_id)
        self.company_id = company_id

    def __str__(self) -> str:
        return f"no company {self.company_id}"
