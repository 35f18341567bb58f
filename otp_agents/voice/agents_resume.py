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
- the agent that was talking takes over again, with its own ``chat_ctx``;
- the session is linked to the participant it was linked to (``RoomOptions.participant_identity``,
  unless the app names one), not to whoever joins first.

Until the caller next speaks, the agent says nothing it did not say before: the greeting of
``on_enter`` (and any ``say``/``generate_reply`` of the start) is skipped, and ``on_enter``'s own
logic still runs. The next answer then comes from the conversation as it was before the crash.
(A call that died before the agent said anything gets its greeting.) Requests to LiveKit's server
that reach outside the process, a SIP dial-out above all, are not sent again
(:mod:`~.agents_once`).

One job runs in a leaf, so the hooks go on LiveKit's ``AgentSession`` class for this process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from otp_agents.voice.agents_once import SideEffects
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
    """The hooks for one job: ``send`` takes each checkpoint (from the job's loop) and returns a
    future done once the supervisor has it."""

    def __init__(
        self,
        state: SessionState | None,
        send: Callable[[bytes], concurrent.futures.Future[None]],
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
        self.cost_max = 0.0  # the longest capture + encode, in seconds: it runs on the job's loop
        self._last = b""
        self._baseline: dict[str, str] = {}  # userdata as the entrypoint built it
        self.session: Any = None
        self.effects = SideEffects(state.effects if state is not None else {}, self._saved)

    def install(self) -> None:
        from livekit.agents import AgentSession

        hooks = self
        start, generate_reply, say = AgentSession.start, AgentSession.generate_reply, AgentSession.say

        async def resumed_start(session: Any, agent: Any, **kwargs: Any) -> Any:
            linked = hooks.state.participant if hooks.state is not None else None
            if linked and kwargs.get("room") is not None:
                kwargs = _linked_to(linked, kwargs)
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
        self.effects.install()

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
        self.resumed = True
        self.quiet = any(item.get("role") == "assistant" for item in state.history.get("items", []))
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

    async def at_turn_boundary(self) -> concurrent.futures.Future[None] | None:
        """On the job's loop: wait until the agent listens and the caller is not speaking, then
        checkpoint (a recycle hands the call over there). Returns the checkpoint's delivery."""
        session = self.session
        if session is not None:
            boundary = asyncio.Event()

            def check(_: Any = None) -> None:
                if session.agent_state == "listening" and session.user_state != "speaking":
                    boundary.set()

            session.on("agent_state_changed", check)
            session.on("user_state_changed", check)
            try:
                check()
                await boundary.wait()
            finally:
                session.off("agent_state_changed", check)
                session.off("user_state_changed", check)
        self._last = b""  # sent even if unchanged: the last thing before the hand-over
        return self.checkpoint()

    async def _saved(self) -> None:
        done = self.checkpoint()
        if done is not None:
            await asyncio.wrap_future(done)

    def _follow(self, session: Any) -> None:
        self.session = session

        def changed(event: Any) -> None:
            item = getattr(event, "item", None)
            if self.quiet and getattr(item, "role", None) == "user":
                self.quiet = False  # the caller spoke: the conversation goes on
            self.checkpoint(session)

        for name in _EVENTS:
            session.on(name, changed)
        self.checkpoint(session)

    def checkpoint(self, session: Any = None) -> concurrent.futures.Future[None] | None:
        """Send the session's state if it changed; before the session starts, the state handed
        back (not restored yet) stands, with the once-only requests so far."""
        started = time.perf_counter()
        session = session or self.session
        if session is None:
            state = self.state or SessionState(history={"items": []})
            state = dataclasses.replace(state, effects=self.effects.done)
        else:
            state = self._capture(session)
        data = encode(state, self.limit)
        self.cost_max = max(self.cost_max, time.perf_counter() - started)
        if data == self._last:
            return None
        self._last = data
        self.checkpoints += 1
        return self.send(data)

    def _capture(self, session: Any) -> SessionState:
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
        state.effects = self.effects.done
        return state


def _linked_to(identity: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``session.start``'s arguments, linked to the caller the call was with (unless the app
    names one itself): a restarted job listens to the same participant, not the first to join."""
    from livekit.agents import utils
    from livekit.agents.voice.room_io import RoomOptions

    if kwargs.get("room_input_options") is not None:  # LiveKit's older options: the app's own
        return kwargs
    options = kwargs.get("room_options")
    if options is None or not utils.is_given(options):
        return {**kwargs, "room_options": RoomOptions(participant_identity=identity)}
    if isinstance(options, RoomOptions) and not utils.is_given(options.participant_identity):
        return {**kwargs, "room_options": dataclasses.replace(options, participant_identity=identity)}
    return kwargs


__all__ = ["Resume"]
