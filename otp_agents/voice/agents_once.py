"""What a resumed call must not do twice: calls to LiveKit's server API that reach outside the
process (dialling a phone, transferring a call, dispatching another agent, starting a recording).

A restarted job leaf runs the app's entrypoint again, so an app that dials out over SIP in its
entrypoint would ring the callee a second time. Every request of LiveKit's API client goes
through one method (``TwirpClient.request``); for the methods in :data:`ONCE` the leaf:

- writes "in flight" into the call's checkpoint, and waits until the supervisor has it, before
  the request goes out;
- records the server's answer in the checkpoint once it comes;
- on a restart, answers the *n*-th such request of the job from the *n*-th one recorded,
  without sending it: the entrypoint goes on with the same answer (a ``SIPParticipantInfo``).

So each is done at most once per call. A request that was in flight when the process died may or
may not have reached the server: it is not sent again, and the app gets an answer carrying the
request's own participant identity and room, enough for ``ctx.wait_for_participant``. A request
that failed is not recorded: its retry goes out.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("otp_agents.resume")

ONCE = frozenset(
    {
        ("SIP", "CreateSIPParticipant"),
        ("SIP", "TransferSIPParticipant"),
        ("AgentDispatchService", "CreateDispatch"),
        ("Egress", "StartRoomCompositeEgress"),
        ("Egress", "StartTrackCompositeEgress"),
        ("Egress", "StartParticipantEgress"),
        ("Egress", "StartTrackEgress"),
        ("Egress", "StartWebEgress"),
    }
)
IN_FLIGHT = ""  # a recorded request without its answer yet

Effects = dict[str, list[str]]  # "SIP/CreateSIPParticipant" -> answers (base64), in order


class SideEffects:
    """The job's once-only requests: ``done`` is what the checkpoint carries, ``earlier`` what
    the last checkpoint before a restart had; ``saved`` waits until the supervisor has ``done``."""

    def __init__(self, earlier: Effects, saved: Callable[[], Awaitable[None]]) -> None:
        self.earlier = earlier
        self.done: Effects = {}
        self.saved = saved
        self.replayed = 0

    def install(self) -> None:
        from livekit.api.twirp_client import TwirpClient

        request = TwirpClient.request
        effects = self

        async def once(
            client: Any, service: str, method: str, data: Any, headers: Any, response_class: Any, **kw: Any
        ) -> Any:
            if (service, method) not in ONCE:
                return await request(client, service, method, data, headers, response_class, **kw)

            async def send() -> Any:
                return await request(client, service, method, data, headers, response_class, **kw)

            return await effects.run(f"{service}/{method}", data, response_class, send)

        client_class: Any = TwirpClient
        client_class.request = once

    async def run(self, key: str, data: Any, response_class: Any, send: Callable[[], Awaitable[Any]]) -> Any:
        done = self.done.setdefault(key, [])
        index = len(done)
        earlier = self.earlier.get(key, [])
        if index < len(earlier):
            answer = earlier[index]
            done.append(answer)
            self.replayed += 1
            log.warning(
                "%s #%d not sent again: it was %s before the process died",
                key,
                index + 1,
                "answered" if answer else "in flight",
            )
            return _answer(response_class, answer, data)
        done.append(IN_FLIGHT)
        await self.saved()  # the supervisor knows before the world is touched
        try:
            response = await send()
        except BaseException:
            done.pop()  # it failed: not done, a retry may go out
            raise
        done[index] = base64.b64encode(response.SerializeToString()).decode()
        await self.saved()
        return response


def _answer(response_class: Any, answer: str, request: Any) -> Any:
    if answer:
        return response_class.FromString(base64.b64decode(answer))
    response = response_class()  # in flight when the process died: what the request says
    for name in ("participant_identity", "room_name", "sip_call_id"):
        if hasattr(response, name) and hasattr(request, name):
            setattr(response, name, getattr(request, name))
    return response


__all__ = ["IN_FLIGHT", "ONCE", "Effects", "SideEffects"]
