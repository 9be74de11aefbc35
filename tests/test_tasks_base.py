import pytest

from fleetlm.errors import FleetError
from fleetlm.tasks.base import CHECKS, Task, TaskError


def test_task_accepts_known_checks_and_is_frozen():
    for check in CHECKS:
        t = Task("d", 1, "k", "q?", "a", check)
        assert t.check == check
    with pytest.raises(AttributeError):
        t.answer = "b"  # type: ignore[misc]


def test_unknown_check_is_a_fleet_error():
    with pytest.raises(TaskError, match="unknown check"):
        Task("d", 1, "k", "q?", "a", "fuzzy")
    assert issubclass(TaskError, FleetError)
