"""fleetlm.agent.bench_tasks: >= 100 seeded multi-step tasks, each solvable with its tools, checked right."""

import pytest

from fleetlm.agent.bench_tasks import FAMILIES, AgentTask, generate_tasks, last_number, solve
from fleetlm.agent.tools import ToolDefinitionError


@pytest.fixture(scope="module")
def tasks():
    return generate_tasks()


def test_the_set_is_large_seeded_and_covers_every_family(tasks):
    assert len(tasks) >= 100 and len({t.id for t in tasks}) == len(tasks)
    assert {t.family for t in tasks} == set(FAMILIES) and len(FAMILIES) == 7
    again = generate_tasks()
    assert [t.to_dict() for t in again] == [t.to_dict() for t in tasks]  # same seed, same tasks
    other = generate_tasks(seed=1)
    assert [t.prompt for t in other] != [t.prompt for t in tasks]
    assert all(len(t.solution) >= 2 for t in tasks)  # every task takes several tool calls
    assert {g for t in tasks for g in t.tools} == {"files", "sqlite", "calculator"}
    assert len({t.prompt + str(t.files) + str(t.sql) for t in tasks}) == len(tasks)


def test_every_reference_solution_passes_its_checker(tasks, tmp_path):
    for i, task in enumerate(tasks):
        ws = task.prepare(tmp_path / str(i))
        answer = solve(task, ws)
        assert task.check(answer, ws) == (True, ""), task.id


def test_wrong_answers_and_untouched_state_fail(tasks, tmp_path):
    for i, task in enumerate(tasks[:len(FAMILIES)]):
        ws = task.prepare(tmp_path / str(i))
        ok, why = task.check(task.answer, ws)  # the right answer, but the work was not done
        assert ok == (not task.expect_files and not task.expect_sql), task.id
        if not ok:
            assert why
        solve(task, ws)
        wrong = "Nobody" if task.answer_kind == "text" else str(float(task.answer) + 1)
        assert task.check(wrong, ws)[0] is False and task.check(None, ws) == (False, "no answer")


def test_answers_are_read_leniently_but_exactly():
    task = AgentTask("t", "f", "p", ["calculator"], "1234.5")
    assert task.check("The total is $1,234.50.", ".")[0]
    assert task.check("1234.5", ".")[0] and not task.check("1234.6", ".")[0]
    assert not task.check("about 1234", ".")[0] and not task.check("none", ".")[0]
    name = AgentTask("t", "f", "p", ["sqlite"], "Ada", answer_kind="text")
    assert name.check("ada", ".")[0] and name.check("The name is 'Ada'.", ".")[0]
    assert not name.check("Adam", ".")[0]
    assert last_number("a 1, b -2.5") == -2.5 and last_number("x") is None


def test_unknown_families_are_a_clear_error():
    with pytest.raises(ToolDefinitionError, match="unknown task families"):
        generate_tasks(5, families=["chess"])
    assert {t.family for t in generate_tasks(4, families=["restock"])} == {"restock"}
