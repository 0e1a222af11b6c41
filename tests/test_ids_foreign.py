"""The one rule every store applies to a run record it reads at a run's key."""

from __future__ import annotations

from fastcheckpoint._ids import foreign_run, run_key


def test_a_record_naming_its_own_run_belongs_at_its_key() -> None:
    assert foreign_run(run_key("order-1"), "order-1") is None


def test_a_record_copied_from_another_run_names_that_run() -> None:
    assert foreign_run(run_key("order-1"), "order-2") == (
        "names another run ('order-2'), copied over from it")


def test_a_run_id_no_key_can_be_made_of_is_foreign_without_raising() -> None:
    assert foreign_run(run_key("order-1"), "order-\ud800") == (
        "names a run id that is not UTF-8 text")


def test_a_long_foreign_run_id_is_cut_in_the_problem() -> None:
    problem = foreign_run(run_key("order-1"), "x" * 1000)
    assert problem is not None
    assert "x" * 80 in problem
    assert "x" * 81 not in problem
