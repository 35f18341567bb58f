"""``app = "agent.py"``: a LiveKit Agents app as a pool of supervised jobs, in a few lines.

A child table with an ``app`` key is shorthand for a supervisor of three children; ``check``
prints what it becomes::

    [[children]]
    id = "agents"
    app = "agent.py"        # the unmodified LiveKit Agents app file
    max_jobs = 10           # jobs at once on this node (the jobs' supervisor's max_children)

    agents                  one_for_one
    ├─ zygote               the app imported, LiveKit's warm-up and the app's prewarm run, once
    ├─ jobs                 simple_one_for_one: one leaf per job, forked from the zygote,
    │  └─ job               transient: a dead, hung or leaking job process is restarted
    └─ dispatcher           registers with LiveKit for the app; each accepted job -> a leaf

The dispatcher is listed last, so on a stop it goes first: it drains (no new jobs; running
calls finish, up to ``drain`` seconds), then the jobs still running get ``job_shutdown``.
The zygote's environment carries a hash of the app file: a reload after the app changed
replaces the zygote (new jobs run the new code) and leaves running jobs alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from otp_agents.wire.env import (
    ENV_APP,
    ENV_APP_DIGEST,
    ENV_APP_LLM_MODEL,
    ENV_APP_LLM_SCRIPT,
    ENV_APP_LLM_URL,
    ENV_APP_NEVER_KEPT,
    ENV_APP_PROVIDERS,
)
from otp_agents.wire.messages import MAX_CHECKPOINT

ZYGOTE_PREPARE = "otp_agents.voice.agents_zygote:prepare"
JOB_MODULE = "workers.agents_job:main"
DISPATCHER_MODULE = "workers.livekit_dispatcher:main"
LIVEKIT_DRAIN = 3600.0  # LiveKit Agents' own drain_timeout default: a deploy never cuts a call


class AppPool(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    id: str
    app: Annotated[str, msgspec.Meta(min_length=1)]
    max_jobs: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 8
    # Overrides of the app's own options (unset: the app's; the dispatcher logs which is used).
    agent_name: str | None = None
    load_threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    providers: Literal["app", "offline"] = "app"
    llm_script: str | None = None
    llm_url: str | None = None
    llm_model: str = "local"
    idle: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2  # job processes forked ahead of need
    drain: Annotated[float, msgspec.Meta(gt=0)] = LIVEKIT_DRAIN
    job_shutdown: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    job_start_timeout: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # The jobs' supervisor: a crash of one job's process counts here, never a job that failed.
    intensity: Annotated[int, msgspec.Meta(ge=0)] | None = None  # default: max(3, max_jobs)
    period: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    health: dict[str, Any] = {}  # each job's health table (heartbeat, memory)
    # A call's checkpoint (it resumes after its process dies): kept on disk too (a restart of
    # otp-agents itself resumes calls), in memory only, or not at all.
    checkpoint: Literal["disk", "memory", "off"] = "disk"
    checkpoint_max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=MAX_CHECKPOINT)] = 65536
    # userdata field names never checkpointed, on top of the built-in list (card, cvv, ...)
    never_checkpoint: list[Annotated[str, msgspec.Meta(min_length=2, pattern=r"^[A-Za-z0-9_]+$")]] = []
    env: dict[str, str] = {}
    # As on any child of its parent.
    restart: Literal["permanent", "transient", "temporary"] = "permanent"
    significant: bool = False
    logs: dict[str, Any] = {}


def digest(path: str | Path) -> str:
    """A short hash of the app file (empty when it cannot be read: its zygote will say why)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def expand(pool: AppPool) -> dict[str, Any]:
    """The supervisor table the pool stands for."""
    env = {ENV_APP: pool.app, ENV_APP_PROVIDERS: pool.providers, ENV_APP_LLM_MODEL: pool.llm_model}
    if pool.llm_script:
        env[ENV_APP_LLM_SCRIPT] = pool.llm_script
    if pool.llm_url:
        env[ENV_APP_LLM_URL] = pool.llm_url
    if pool.never_checkpoint:
        env[ENV_APP_NEVER_KEPT] = ",".join(pool.never_checkpoint)
    env |= pool.env
    image = pool.id
    dispatcher_args = ["--jobs", "../jobs", "--app", "--max-jobs", str(pool.max_jobs)]
    if pool.agent_name is not None:
        dispatcher_args += ["--agent-name", pool.agent_name]
    if pool.load_threshold is not None:
        dispatcher_args += ["--load-threshold", str(pool.load_threshold)]
    job: dict[str, Any] = {
        "id": "job",
        "module": JOB_MODULE,
        "zygote": image,
        "restart": "transient",
        "shutdown": pool.job_shutdown,
        "start_timeout": pool.job_start_timeout,
        "env": env,
        "checkpoint_max_bytes": 0 if pool.checkpoint == "off" else pool.checkpoint_max_bytes,
        "checkpoint_store": "memory" if pool.checkpoint == "memory" else "disk",
    }
    if pool.health:
        job["health"] = pool.health
    table: dict[str, Any] = {
        "id": pool.id,
        "strategy": "one_for_one",
        "intensity": 3,
        "period": 60,
        "restart": pool.restart,
        "significant": pool.significant,
        "children": [
            {
                "id": "zygote",
                "image": image,
                "preload": [ZYGOTE_PREPARE],
                "idle": pool.idle,
                "env": env | {ENV_APP_DIGEST: digest(pool.app)},
                "start_timeout": 180,
                "shutdown": 5,
            },
            {
                "id": "jobs",
                "strategy": "simple_one_for_one",
                "max_children": pool.max_jobs,
                "intensity": pool.intensity if pool.intensity is not None else max(3, pool.max_jobs),
                "period": pool.period,
                "children": [job],
            },
            {
                "id": "dispatcher",
                "module": DISPATCHER_MODULE,
                "zygote": image,
                "args": dispatcher_args,
                "env": env,
                "shutdown": pool.drain,
                "start_timeout": 60,
            },
        ],
    }
    if pool.logs:
        table["logs"] = pool.logs
    return table


__all__ = ["AppPool", "digest", "expand"]
