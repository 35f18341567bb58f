"""A LiveKit Agents call that survives its process: the job leaf checkpoints the session as it
goes, and a restarted leaf picks the call up where it was.

**Checkpoint.** Once the app's session has started, after every item added to the conversation
(a turn, a tool call, a tool result, a hand-over) the session's state (:mod:`~.agents_state`)
goes to the supervisor as the leaf's checkpoint. The supervisor keeps it across the leaf's
restarts.

**Resume.** The restarted leaf runs the job again from its ticket, so the app's entrypoint runs
again and builds its session as it always does. When that session starts, before anything is
spoken:

- the conversation is put back (``session.history``);
- ``userdata``'s kept fields are restored, with agent references pointing at the new agents;
- the agent that was talking takes over again, with its own ``chat_ctx``.

Until the caller next speaks, the agent says nothing it did not say before: the greeting of
``on_enter`` (and any ``say``/``generate_reply`` of the start) is skipped, and ``on_enter``'s own
logic still runs. The next answer then comes from the conversation as it was before the crash.

One job runs in a leaf, so the hooks go on LiveKit's ``AgentSession`` class for this process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from otp_agents.voice.agents_state import (
    NEVER_KEPT,
    SessionState,
    agent_in,
    capture,
    class_name,
    encode,
    fingerprints,
    restore_userdata,
)

log = logging.getLogger("otp_agents.resume")
_EVENTS = ("conversation_item_added", "function_tools_executed", "agent_state_changed")


class Resume:
    """The hooks for one job: ``send`` takes each checkpoint (from the job's loop)."""

    def __init__(
        self,
        state: SessionState | None,
        send: Callable[[bytes], None],
        *,
        limit: int,
        never: tuple[str, ...] = NEVER_KEPT,
    ) -> None:
        self.state = state
        self.send = send
        self.limit = limit
        self.never = never
        self.quiet = False  # resumed, and the caller has not spoken since
        self.skipped = 0  # replies not spoken again on resume
        self.resumed = False
        self.checkpoints = 0
        self._last = b""
        self._baseline: dict[str, str] = {}  # userdata as the entrypoint built it

    def install(self) -> None:
        from livekit.agents import AgentSession

        hooks = self
        start, generate_reply, say = AgentSession.start, AgentSession.generate_reply, AgentSession.say

        async def resumed_start(session: Any, agent: Any, **kwargs: Any) -> Any:
            agent = hooks._before_start(session, agent)
            result = await start(session, agent, **kwargs)
            hooks._follow(session)
            return result

        def quiet_reply(session: Any, **kwargs: Any) -> Any:
            return hooks._skipped() if hooks.quiet else generate_reply(session, **kwargs)

        def quiet_say(session: Any, *args: Any, **kwargs: Any) -> Any:
            return hooks._skipped() if hooks.quiet else say(session, *args, **kwargs)

        session_class: Any = AgentSession
        session_class.start = resumed_start
        session_class.generate_reply = quiet_reply
        session_class.say = quiet_say

    # -- resume --------------------------------------------------------------------------------

    def _before_start(self, session: Any, agent: Any) -> Any:
        state, self.state = self.state, None  # once: a second session of the job starts fresh
        userdata = getattr(session, "_userdata", None)
        self._baseline = fingerprints(userdata, self.never) if userdata is not None else {}
        if state is None:
            return agent
        from livekit.agents.llm import ChatContext

        restored = restore_userdata(userdata, state)
        target = agent_in(userdata, state)
        if target is None and state.agent == class_name(agent):
            target = agent
        session._chat_ctx = ChatContext.from_dict(state.history)
        if target is not None and state.agent_history is not None:
            target._chat_ctx = ChatContext.from_dict(state.agent_history)
        self.quiet = self.resumed = True
        log.warning(
            "resumed the call: %d items of history, agent %s, userdata %s%s",
            len(session._chat_ctx.items),
            state.agent or "-",
            ", ".join(restored) or "-",
            f"; {state.trimmed} oldest turns were dropped earlier" if state.trimmed else "",
        )
        return target if target is not None else agent

    def _skipped(self) -> Any:
        from livekit.agents.voice.speech_handle import SpeechHandle

        self.skipped += 1
        handle = SpeechHandle.create()
        handle._mark_done()
        return handle

    # -- checkpoints ---------------------------------------------------------------------------

    def _follow(self, session: Any) -> None:
        def changed(event: Any) -> None:
            item = getattr(event, "item", None)
            if self.quiet and getattr(item, "role", None) == "user":
                self.quiet = False  # the caller spoke: the conversation goes on
            self.checkpoint(session)

        for name in _EVENTS:
            session.on(name, changed)
        self.checkpoint(session)

    def checkpoint(self, session: Any) -> None:
        try:
            agent = session.current_agent
        except RuntimeError:
            agent = None
        participant = None
        with contextlib.suppress(Exception):
            linked = session.room_io.linked_participant if session._room_io is not None else None
            participant = linked.identity if linked is not None else None
        userdata = getattr(session, "_userdata", None)
        state = capture(
            session.history,
            agent,
            userdata,
            participant=participant,
            never=self.never,
            baseline=self._baseline,
        )
        data = encode(state, self.limit)
        if data != self._last:
            self._last = data
            self.checkpoints += 1
            self.send(data)


__all__ = ["Resume"]
