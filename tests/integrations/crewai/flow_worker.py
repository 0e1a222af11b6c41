"""CrewAI flows of plain methods (no LLM) on a ``FastFlowPersistence``, for the tests and as
a separate process: ``python flow_worker.py URL continue|resume FLOW_ID [...]`` runs each job
on the store of URL and prints ``RESULT <json list of the flows' states>`` as its last line
(one process for all jobs: importing CrewAI takes seconds).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from crewai.flow.async_feedback.types import HumanFeedbackPending, PendingFeedbackContext
from crewai.flow.flow import Flow, listen, start
from crewai.flow.human_feedback import human_feedback
from crewai.flow.persistence import persist
from pydantic import BaseModel

from fastcheckpoint.integrations.crewai import FastFlowPersistence


class CounterState(BaseModel):
    id: str = ""
    runs: int = 0
    steps: list[str] = []


class ReviewState(BaseModel):
    id: str = ""
    draft: str = ""
    verdict: str = ""


class QueueProvider:
    """Asks for feedback by pausing the flow: the request waits in the approval queue."""

    def request_feedback(self, context: PendingFeedbackContext, flow: Flow[Any]) -> str:
        raise HumanFeedbackPending(context=context)


def counter_flow(persistence: FastFlowPersistence) -> type[Flow[CounterState]]:
    @persist(persistence)
    class CounterFlow(Flow[CounterState]):
        @start()
        def begin(self) -> None:
            self.state.runs += 1
            self.state.steps.append(f"begin-{self.state.runs}")

        @listen(begin)
        def finish(self) -> str:
            self.state.steps.append(f"finish-{self.state.runs}")
            return "done"

    return CounterFlow


def review_flow(persistence: FastFlowPersistence) -> type[Flow[ReviewState]]:
    @persist(persistence)
    class ReviewFlow(Flow[ReviewState]):
        @start()
        def write(self) -> None:
            self.state.draft = "refund order A-17"

        @listen(write)
        @human_feedback(message="Send this refund?", provider=QueueProvider())
        def review(self) -> dict[str, str]:
            return {"draft": self.state.draft}

        @listen(review)
        def decide(self) -> str:
            feedback = self.last_human_feedback
            self.state.verdict = "" if feedback is None else feedback.feedback
            return self.state.verdict

    return ReviewFlow


def main(argv: list[str]) -> int:
    url, *jobs = argv
    persistence = FastFlowPersistence(url)
    try:
        results = [run(persistence, command, flow_id)
                   for command, flow_id in zip(jobs[::2], jobs[1::2], strict=True)]
    finally:
        persistence.close()
    print("RESULT " + json.dumps(results))
    return 0


def run(persistence: FastFlowPersistence, command: str, flow_id: str) -> dict[str, Any]:
    """One job: ``continue`` runs ``CounterFlow`` again on the state restored by flow id;
    ``resume`` loads the paused ``ReviewFlow`` and resumes it with the reviewer's decision."""
    if command == "continue":
        flow = counter_flow(persistence)()
        flow.kickoff(inputs={"id": flow_id})
        return flow.state.model_dump()
    if command == "resume":
        resumed = review_flow(persistence).from_pending(flow_id, persistence)
        resumed.resume(persistence.feedback(flow_id) or "")
        return resumed.state.model_dump()
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
