"""A CrewAI flow whose state and human review live in a fastcheckpoint store.

Runs offline (the flow's methods are plain Python, no LLM); needs
``pip install 'fastcheckpoint[crewai]'``:

    python examples/crewai_flow.py [STORE_URL]

The flow drafts a refund, then asks for a review: it pauses, and the request waits in
fastcheckpoint's approval queue (``fastcheckpoint runs --status paused``). A reviewer approves
it (here through the manager; ``fastcheckpoint approve FLOW_ID --approver ana`` does the same),
and the flow is loaded back by its id, from a new persistence object as a new process would,
and resumed with the decision. A SQLite file in a temporary directory is the default store.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")

from crewai.flow.async_feedback.types import HumanFeedbackPending, PendingFeedbackContext
from crewai.flow.flow import Flow, listen, start
from crewai.flow.human_feedback import human_feedback
from crewai.flow.persistence import persist
from pydantic import BaseModel

from fastcheckpoint import CheckpointStatus
from fastcheckpoint.integrations.crewai import FastFlowPersistence


class RefundState(BaseModel):
    id: str = ""
    order: str = "A-17"
    amount: float = 0.0
    verdict: str = ""


class ApprovalQueue:
    """Asks for feedback by pausing the flow; the request waits in the approval queue."""

    def request_feedback(self, context: PendingFeedbackContext, flow: Flow[Any]) -> str:
        raise HumanFeedbackPending(context=context)


def refund_flow(persistence: FastFlowPersistence) -> type[Flow[RefundState]]:
    @persist(persistence)
    class RefundFlow(Flow[RefundState]):
        @start()
        def draft(self) -> None:
            self.state.amount = 120.5

        @listen(draft)
        @human_feedback(message="Send this refund?", provider=ApprovalQueue())
        def review(self) -> dict[str, Any]:
            return {"order": self.state.order, "amount": self.state.amount}

        @listen(review)
        def settle(self) -> str:
            feedback = self.last_human_feedback
            self.state.verdict = "" if feedback is None else feedback.feedback
            return self.state.verdict

    return RefundFlow


def main(url: str) -> None:
    persistence = FastFlowPersistence(url)
    try:
        flow = refund_flow(persistence)()
        outcome = flow.kickoff()
        flow_id = flow.state.id
        print("paused for review:", isinstance(outcome, HumanFeedbackPending))
        for run in persistence.manager.list_runs(status=CheckpointStatus.PAUSED):
            print("waiting:", run.run_id == flow_id, run.approval["request"]["message"])
        persistence.manager.approve(flow_id, approver="ana@example.com", comment="within policy")
    finally:
        persistence.close()

    persistence = FastFlowPersistence(url)  # as another process would
    try:
        resumed = refund_flow(persistence).from_pending(flow_id, persistence)
        resumed.resume(persistence.feedback(flow_id) or "")
        print("verdict:", resumed.state.verdict)
        steps = [item.step_name for item in persistence.manager.list_checkpoints(flow_id)]
        print("checkpoints, newest first:", steps)
    finally:
        persistence.close()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as scratch:
            main(f"sqlite:///{Path(scratch) / 'flows.db'}")
