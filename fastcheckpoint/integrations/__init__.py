"""Adapters that plug fastcheckpoint stores into agent frameworks.

Each integration lives in its own module and imports its framework only there, so
``import fastcheckpoint`` never needs one; each module names its extra when the framework is
missing:

* ``fastcheckpoint.integrations.crewai``: ``FastFlowPersistence``, CrewAI's flow
  persistence, pending feedback in the approval queue (extra ``crewai``).
* ``fastcheckpoint.integrations.google_adk``: ``FastSessionService``, a Google ADK session
  service (extra ``google-adk``).
* ``fastcheckpoint.integrations.langgraph``: ``FastCheckpointSaver`` (extra ``langgraph``).
* ``fastcheckpoint.integrations.agent_framework``: ``FastCheckpointStorage``, Microsoft Agent
  Framework's workflow checkpoint storage (extra ``agent-framework``).
* ``fastcheckpoint.integrations.openai_agents``: ``FastSession`` (an OpenAI Agents SDK
  session) and ``RunStateStore`` (interrupted runs in the approval queue), extra
  ``openai-agents``.
* ``fastcheckpoint.integrations.pydantic_ai``: ``FastConversationStore``, a Pydantic AI
  conversation store (extra ``pydantic-ai``).
"""
