"""A job as the dispatcher hands it to its leaf: the assignment, with what the app's request
handler accepted it as, in a file only this user can read (it holds the room's access token).

The leaf reads it at every start, so a leaf restarted after a crash runs the same job again,
in the same room, as the same participant. The dispatcher deletes it once the job has ended.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from otp_agents.errors import OtpAgentsError

if TYPE_CHECKING:
    from livekit.agents.job import RunningJobInfo


class TicketError(OtpAgentsError):
    """A ticket file that cannot be read; the message names it."""


class Ticket(msgspec.Struct, frozen=True, kw_only=True):
    job: bytes  # livekit.protocol.agent.Job, serialized
    url: str  # the LiveKit server the job's room is on
    token: str  # the agent participant's access token for that room
    worker_id: str
    identity: str  # what the request handler accepted the job as
    name: str = ""
    metadata: str = ""
    attributes: dict[str, str] = {}
    fake_job: bool = False
    received_at: float = 0.0
    accepted_at: float = 0.0
    assigned_at: float = 0.0

    @classmethod
    def of(cls, job: Any, *, url: str, token: str, worker_id: str, accept: Any, received_at: float) -> Ticket:
        """From a ``livekit.protocol.agent.Job`` and LiveKit's ``JobAcceptArguments``."""
        return cls(
            job=job.SerializeToString(),
            url=url,
            token=token,
            worker_id=worker_id,
            identity=accept.identity or f"agent-{job.id}",
            name=accept.name,
            metadata=accept.metadata,
            attributes=dict(accept.attributes or {}),
            received_at=received_at,
            accepted_at=received_at,
            assigned_at=time.time(),
        )

    def protocol_job(self) -> Any:
        from livekit.protocol import agent

        return agent.Job.FromString(self.job)

    def running_info(self) -> RunningJobInfo:
        """What LiveKit's worker gives a job process (``StartJobRequest.running_job``)."""
        from livekit.agents.job import JobAcceptArguments, RunningJobInfo

        accept = JobAcceptArguments(
            name=self.name, identity=self.identity, metadata=self.metadata, attributes=dict(self.attributes)
        )
        return RunningJobInfo(
            accept_arguments=accept,
            job=self.protocol_job(),
            url=self.url,
            token=self.token,
            worker_id=self.worker_id,
            fake_job=self.fake_job,
            received_at=self.received_at,
            accepted_at=self.accepted_at,
            assigned_at=self.assigned_at,
        )


def path_for(folder: Path, job_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in job_id)[:120] or "job"
    return folder / f"{safe}.job"


def write(folder: Path, job_id: str, ticket: Ticket) -> Path:
    """Write ``ticket`` as ``folder/<job id>.job``, atomically, readable by this user only."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = path_for(folder, job_id)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".job-")  # created 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.msgpack.encode(ticket))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(path: str | Path) -> Ticket:
    try:
        return msgspec.msgpack.decode(Path(path).read_bytes(), type=Ticket)
    except OSError as exc:
        raise TicketError(f"{path}: cannot read the job: {exc.strerror or exc}") from None
    except msgspec.DecodeError as exc:
        raise TicketError(f"{path}: not a job ticket: {exc}") from None


__all__ = ["Ticket", "TicketError", "path_for", "read", "write"]
