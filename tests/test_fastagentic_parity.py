"""What a FastAgentic user relies on beyond its documentation's examples, on fastcheckpoint.

tests/test_fastagentic_docs.py runs FastAgentic's documented examples; these tests pin the rest
of the surface that code written against ``fastagentic.checkpoint`` (1.2.2) touches: call
signatures, positional model fields, copying and pickling, and the JSON of ``to_json`` and
``from_json``. FastAgentic is not imported: each expectation is stated here, with FastAgentic's
behaviour in a comment where it explains it.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import pickle
from typing import Any

import pytest

from fastcheckpoint import (
    Checkpoint,
    CheckpointConfig,
    CheckpointManager,
    CheckpointMetadata,
    CheckpointStatus,
    SerializationError,
)

# -- call shapes ---------------------------------------------------------------------------------

_ = inspect.Parameter.empty
POS, KW = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY

# FastAgentic 1.2.2's parameters (name, kind, default) for each call it offers; ours may add
# keyword-only ones after them.
FASTAGENTIC_CALLS: dict[str, list[tuple[str, inspect._ParameterKind, Any]]] = {
    "__init__": [("store", POS, _), ("config", POS, None)],
    "create": [("run_id", POS, _), ("state", POS, _), ("messages", KW, None),
               ("tool_calls", KW, None), ("context", KW, None), ("step_name", KW, ""),
               ("parent_id", KW, None), ("tags", KW, None), ("ttl_seconds", KW, None),
               ("force", KW, False)],
    "restore": [("run_id", POS, _)],
    "restore_from": [("checkpoint_id", POS, _)],
    "list_checkpoints": [("run_id", POS, _), ("limit", POS, 100)],
    "delete": [("checkpoint_id", POS, _)],
    "delete_run": [("run_id", POS, _)],
    "mark_completed": [("run_id", POS, _)],
    "mark_failed": [("run_id", POS, _), ("error", POS, "")],
    "start": [],
    "stop": [],
}


@pytest.mark.parametrize("name", sorted(FASTAGENTIC_CALLS))
def test_manager_methods_take_fastagentic_arguments(name: str) -> None:
    parameters = list(inspect.signature(getattr(CheckpointManager, name)).parameters.values())[1:]
    ours = [(p.name, p.kind, p.default) for p in parameters]
    expected = FASTAGENTIC_CALLS[name]
    assert ours[: len(expected)] == expected
    assert all(p.kind is KW and p.default is not _ for p in parameters[len(expected):])


def test_models_take_fastagentic_positional_fields() -> None:
    """FastAgentic's models are dataclasses: positional arguments in field order work."""
    metadata = CheckpointMetadata("run-1", "ckpt-000000000001", 3, 10.0, CheckpointStatus.FAILED,
                                  "plan", "ckpt-000000000000", ["t"], 60)
    checkpoint = Checkpoint(metadata, {"step": 3}, [{"role": "user"}], [{"name": "x"}],
                            {"user": "u"})
    config = CheckpointConfig(False, 5.0, 10, 3600.0, 60.0)

    assert (metadata.run_id, metadata.checkpoint_id, metadata.sequence, metadata.created_at,
            metadata.status, metadata.step_name, metadata.parent_id, metadata.tags,
            metadata.ttl_seconds) == ("run-1", "ckpt-000000000001", 3, 10.0,
                                      CheckpointStatus.FAILED, "plan", "ckpt-000000000000",
                                      ["t"], 60)
    assert (checkpoint.state, checkpoint.messages, checkpoint.tool_calls, checkpoint.context) == (
        {"step": 3}, [{"role": "user"}], [{"name": "x"}], {"user": "u"})
    assert (config.auto_checkpoint, config.checkpoint_interval, config.max_checkpoints_per_run,
            config.default_ttl_seconds, config.cleanup_interval) == (False, 5.0, 10, 3600.0, 60.0)


def test_checkpoints_copy_and_pickle() -> None:
    checkpoint = Checkpoint(CheckpointMetadata("run-1", "c", created_at=1.0, tags=["a"]),
                            {"nested": {"n": [1, 2]}})

    assert copy.copy(checkpoint) == checkpoint
    deep = copy.deepcopy(checkpoint)
    assert deep == checkpoint
    assert deep.state["nested"] is not checkpoint.state["nested"]
    assert pickle.loads(pickle.dumps(checkpoint)) == checkpoint


# -- JSON ----------------------------------------------------------------------------------------


def metadata_dict(**changes: Any) -> dict[str, Any]:
    """A metadata dict as FastAgentic's ``CheckpointMetadata.to_dict`` writes it."""
    return {"run_id": "run-1", "checkpoint_id": "ckpt-0123456789ab", "sequence": 2,
            "created_at": 1700000000.0, "status": "active", "step_name": "plan",
            "parent_id": None, "tags": [], "ttl_seconds": None, **changes}


def test_to_json_is_read_by_pythons_json_with_fastagentics_keys() -> None:
    """FastAgentic's ``Checkpoint.from_dict(json.loads(text))`` reads what ``to_json`` writes:
    every key it reads is there (``expires_at`` is one more)."""
    checkpoint = Checkpoint.from_dict({"metadata": metadata_dict(ttl_seconds=60.0),
                                       "state": {"step": 2}, "messages": [{"role": "user"}]})

    data = json.loads(checkpoint.to_json())

    assert set(data) == {"metadata", "state", "messages", "tool_calls", "context"}
    assert {k: data["metadata"][k] for k in metadata_dict()} == metadata_dict(ttl_seconds=60.0)
    assert data["metadata"]["expires_at"] == 1700000060.0
    assert data["state"] == {"step": 2}


def non_finite_checkpoint() -> Checkpoint:
    return Checkpoint(
        CheckpointMetadata("run-1", "c", created_at=1.0),
        state={"score": math.nan, "bounds": [-math.inf, 0.5, math.inf],
               "pair": (math.nan, 1), "nested": {"deep": [{"x": math.inf}]}},
        messages=[{"role": "tool", "value": -math.inf}],
        context={"finite": 2.5},
    )


def test_to_json_writes_nan_and_infinity_as_pythons_json_does() -> None:
    """FastAgentic's ``to_json`` is ``json.dumps``, which writes ``NaN``, ``Infinity`` and
    ``-Infinity`` and reads them back; writing ``null`` would turn them into ``None``."""
    text = non_finite_checkpoint().to_json()

    data = json.loads(text)
    assert math.isnan(data["state"]["score"])
    assert data["state"]["bounds"] == [-math.inf, 0.5, math.inf]
    assert math.isnan(data["state"]["pair"][0])
    assert data["state"]["pair"][1] == 1
    assert data["state"]["nested"] == {"deep": [{"x": math.inf}]}
    assert data["messages"] == [{"role": "tool", "value": -math.inf}]
    assert "null" not in text.replace('"parent_id":null', "").replace('"ttl_seconds":null', "") \
        .replace('"expires_at":null', "")


def test_from_json_gives_back_nan_and_infinity() -> None:
    back = Checkpoint.from_json(non_finite_checkpoint().to_json())

    assert math.isnan(back.state["score"])
    assert back.state["bounds"] == [-math.inf, 0.5, math.inf]
    assert back.state["nested"] == {"deep": [{"x": math.inf}]}
    assert back.messages == [{"role": "tool", "value": -math.inf}]
    assert back.context == {"finite": 2.5}


@pytest.mark.parametrize("kind", [str, bytes, bytearray, memoryview])
def test_from_json_reads_fastagentic_json_with_non_finite_floats(kind: type) -> None:
    """What FastAgentic's file, Redis and S3 stores wrote (``json.dumps(checkpoint.to_dict())``)
    for a state holding NaN: the import path of docs/migrating-from-fastagentic.md reads it."""
    written = json.dumps({"metadata": metadata_dict(),
                          "state": {"loss": math.nan, "best": math.inf}, "messages": [],
                          "tool_calls": [], "context": {}})
    assert "NaN" in written  # what json.dumps writes
    data: Any = written if kind is str else kind(written.encode())

    checkpoint = Checkpoint.from_json(data)

    assert math.isnan(checkpoint.state["loss"])
    assert checkpoint.state["best"] == math.inf
    assert checkpoint.metadata.sequence == 2


def test_a_caller_string_like_the_marker_is_kept() -> None:
    state = {"text": "fastcheckpoint-non-finite-0:NaN", "n": math.nan}

    back = Checkpoint.from_json(Checkpoint(CheckpointMetadata("r", "c"), state).to_json())

    assert back.state["text"] == "fastcheckpoint-non-finite-0:NaN"
    assert math.isnan(back.state["n"])


@pytest.mark.parametrize("text", [
    '{"metadata": {"run_id": "r"}, "state": {"x": NaN',  # NaN, but cut short
    '{"metadata": {"run_id": "r"}, "state": {"x": nan}}',  # not a token json writes
    '{"metadata": {"run_id": "\udcff"}, "state": {"x": NaN}}',  # a lone surrogate
    '{"metadata": {"run_id": "r"}, "state": {"x": 1e400}}',
])
def test_from_json_still_refuses_malformed_text(text: str) -> None:
    with pytest.raises(SerializationError, match="invalid checkpoint JSON"):
        Checkpoint.from_json(text)


def test_deeply_nested_non_finite_json_is_a_serialization_error() -> None:
    deep: Any = math.nan
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(SerializationError):
        Checkpoint(CheckpointMetadata("r", "c"), {"deep": deep}).to_json()
