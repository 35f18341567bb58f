"""Not a LiveKit Agents app: it defines no AgentServer."""

ANSWER = 42
