"""The public helpers on the error types that third-party callers of a store rely on."""

from __future__ import annotations

import pytest

from fastcheckpoint import SequenceConflict


@pytest.mark.parametrize(
    ("latest_sequence", "incarnation", "joining"),
    [
        (-1, "aaaaaaaa", "aaaaaaaa"),  # the run exists without a checkpoint: join it
        (0, "aaaaaaaa", None),  # an ordinary conflict: the run's next sequence is 1
        (5, "aaaaaaaa", None),
        (-1, None, None),  # no incarnation to join
        (None, None, None),  # the store holds no live run
    ],
)
def test_joining_names_the_incarnation_of_a_run_without_a_checkpoint(
    latest_sequence: int | None, incarnation: str | None, joining: str | None
) -> None:
    conflict = SequenceConflict(latest_sequence=latest_sequence, incarnation=incarnation)
    assert conflict.joining == joining


def test_joining_is_read_only() -> None:
    conflict = SequenceConflict(latest_sequence=-1, incarnation="aaaaaaaa")
    with pytest.raises(AttributeError):
        conflict.joining = "bbbbbbbb"  # type: ignore[misc]
