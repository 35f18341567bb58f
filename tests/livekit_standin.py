"""A protocol-level stand-in for a LiveKit server's agent-worker endpoint, for the dispatcher
tests. **Not a LiveKit server**: it speaks only the agent worker protocol (``livekit.protocol.agent``
protobuf messages over a WebSocket at ``/agent``), checks the worker's token with the real
``livekit.api.TokenVerifier``, and lets a test offer jobs, terminate them and drop the connection.
Of the server API (Twirp over HTTP) it answers SIP dial-outs (``CreateSIPParticipant``), counting
them: no phone is rung. No media, no rooms."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from aiohttp import WSMsgType, web
from livekit import api
from livekit.protocol import agent as lk
from livekit.protocol import models, sip

from .loopback_http import serve_app

KEY, SECRET = "standin-key", "standin-secret-0123456789abcdefghij"


@dataclass
class StandIn:
    url: str = ""
    received: list[lk.WorkerMessage] = field(default_factory=list)
    connections: int = 0
    rejected: int = 0
    dials: list[sip.CreateSIPParticipantRequest] = field(default_factory=list)
    _ws: web.WebSocketResponse | None = None
    _changed: anyio.Event = field(default_factory=anyio.Event)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def of(self, which: str) -> list[Any]:
        return [getattr(m, which) for m in self.received if m.WhichOneof("message") == which]

    def job_status(self, job_id: str) -> list[str]:
        return [lk.JobStatus.Name(u.status) for u in self.of("update_job") if u.job_id == job_id]

    async def wait(self, check: Any, bound: float = 20.0) -> Any:
        with anyio.fail_after(bound):
            while not (result := check()):
                self._changed = anyio.Event()
                await self._changed.wait()
        return result

    async def handler(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        try:
            claims = api.TokenVerifier(KEY, SECRET).verify(auth.removeprefix("Bearer "))
            assert claims.video and claims.video.agent
        except Exception:
            self.rejected += 1
            self._changed.set()
            return web.Response(status=401, text="invalid token")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        self._ws = ws
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    continue
                wm = lk.WorkerMessage.FromString(msg.data)
                self.received.append(wm)
                if wm.WhichOneof("message") == "register":
                    await self._send(
                        lk.ServerMessage(register=lk.RegisterWorkerResponse(worker_id=f"W{next(self._ids)}"))
                    )
                self._changed.set()
        finally:
            if self._ws is ws:
                self._ws = None
            self._changed.set()
        return ws

    async def dial(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        try:
            claims = api.TokenVerifier(KEY, SECRET).verify(auth.removeprefix("Bearer "))
            assert claims.sip and claims.sip.call
        except Exception:
            return web.json_response({"code": "unauthenticated", "msg": "invalid token"}, status=401)
        dial = sip.CreateSIPParticipantRequest.FromString(await request.read())
        self.dials.append(dial)
        self._changed.set()
        answer = sip.SIPParticipantInfo(
            participant_id=f"PA_{len(self.dials)}",
            participant_identity=dial.participant_identity,
            room_name=dial.room_name,
            sip_call_id=f"SCL_{len(self.dials)}",
        )
        return web.Response(body=answer.SerializeToString(), content_type="application/protobuf")

    async def _send(self, msg: lk.ServerMessage) -> None:
        assert self._ws is not None, "no worker connected"
        await self._ws.send_bytes(msg.SerializeToString())

    async def offer(self, job_id: str, room: str, *, metadata: str = "", caller: str = "") -> bool:
        """Ask for availability; assign the job if the worker accepts. Returns its answer."""
        job = lk.Job(id=job_id, type=lk.JT_ROOM, room=models.Room(name=room), metadata=metadata)
        if caller:
            job.participant.identity = caller
        before = len(self.of("availability"))
        await self._send(lk.ServerMessage(availability=lk.AvailabilityRequest(job=job)))
        answers = await self.wait(lambda: self.of("availability")[before:])
        if answers[0].available:
            await self._send(lk.ServerMessage(assignment=lk.JobAssignment(job=job, url=self.url, token="t")))
        return bool(answers[0].available)

    async def terminate(self, job_id: str) -> None:
        await self._send(lk.ServerMessage(termination=lk.JobTermination(job_id=job_id)))

    async def drop(self) -> None:
        """Close the worker's connection from the server's side."""
        if self._ws is not None:
            await self._ws.close()


@asynccontextmanager
async def serving() -> AsyncIterator[StandIn]:
    stand_in = StandIn()
    app = web.Application()
    app.router.add_get("/agent", stand_in.handler)
    app.router.add_post("/twirp/livekit.SIP/CreateSIPParticipant", stand_in.dial)
    async with serve_app(app) as port:
        stand_in.url = f"ws://127.0.0.1:{port}"
        yield stand_in
