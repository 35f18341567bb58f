"""``app = "agent.py"`` in a tree: what it expands to, and bad pools refused before anything
starts, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from otp_agents.errors import ConfigError
from otp_agents.spec.app_pool import digest
from otp_agents.spec.load import loads
from otp_agents.spec.model import Strategy, SupervisorSpec, WorkerSpec, ZygoteSpec, stop_bound

from .helpers import ROOT

APP = ROOT / "workers" / "livekit_agents_app" / "agent.py"


def pool(extra: str = "", app: Path = APP) -> str:
    return f'[[children]]\nid = "agents"\napp = "{app}"\n{extra}\n'


def test_an_app_pool_is_a_zygote_a_jobs_supervisor_and_a_dispatcher_stopped_first() -> None:
    root = loads(pool('max_jobs = 5\nagent_name = "front-desk"\nproviders = "offline"\ndrain = 120'))
    (agents,) = root.children
    assert isinstance(agents, SupervisorSpec) and agents.id == "agents"
    zygote, jobs, dispatcher = agents.children
    assert isinstance(zygote, ZygoteSpec) and zygote.preload == ["otp_agents.voice.agents_zygote:prepare"]
    assert zygote.env["OTP_AGENTS_APP"] == str(APP) and zygote.env["OTP_AGENTS_APP_PROVIDERS"] == "offline"
    assert zygote.env["OTP_AGENTS_APP_DIGEST"] == digest(APP)
    assert isinstance(jobs, SupervisorSpec) and jobs.strategy is Strategy.SIMPLE_ONE_FOR_ONE
    assert jobs.max_children == 5
    (job,) = jobs.children
    assert isinstance(job, WorkerSpec) and job.zygote == "agents" and job.restart.value == "transient"
    assert "OTP_AGENTS_APP_DIGEST" not in job.env  # a changed app replaces the zygote, not the jobs
    assert isinstance(dispatcher, WorkerSpec) and dispatcher.zygote == "agents"
    assert dispatcher.args[:2] == ["--jobs", "../jobs"] and "--agent-name" in dispatcher.args
    assert "OTP_AGENTS_APP_DIGEST" not in dispatcher.env
    # listed last, stopped first: its drain, then the jobs' shutdown, then the zygote's
    bound = stop_bound(agents)
    assert bound is not None and bound >= 120 + 15 + 5
    assert job.checkpoint_store == "disk" and job.checkpoint_max_bytes == 65536  # calls resume


@pytest.mark.parametrize(("setting", "store", "limit"), [("memory", "memory", 65536), ("off", "disk", 0)])
def test_a_pools_calls_are_checkpointed_in_memory_only_or_not_at_all(
    setting: str, store: str, limit: int
) -> None:
    root = loads(pool(f'checkpoint = "{setting}"\nnever_checkpoint = ["customer_phone", "dob"]'))
    (agents,) = root.children
    assert isinstance(agents, SupervisorSpec)
    jobs = agents.children[1]
    assert isinstance(jobs, SupervisorSpec)
    (job,) = jobs.children
    assert isinstance(job, WorkerSpec)
    assert (job.checkpoint_store, job.checkpoint_max_bytes) == (store, limit)
    assert job.env["OTP_AGENTS_APP_NEVER_KEPT"] == "customer_phone,dob"


@pytest.mark.parametrize(
    ("extra", "where", "says"),
    [
        ("max_job = 3", "children[0]", "max_job"),
        ("max_jobs = 0", "children[0].max_jobs", ">= 1"),
        ('providers = "cloud"', "children[0].providers", "offline"),
        ('llm_script = "/nonexistent/script.toml"', "children[0].llm_script", "no such file"),
        ('command = ["true"]', "children[0]", "exactly one of"),
        (
            'checkpoint = "off"\nhealth = { memory_soft_mb = 500 }',
            "children[0].health.memory_soft_mb",
            "end the call",
        ),
        (
            'checkpoint = "off"\nhealth = { max_lifetime = 600 }',
            "children[0].health.max_lifetime",
            "end the call",
        ),
        ('checkpoint = "cloud"', "children[0].checkpoint", "memory"),
        ('never_checkpoint = ["a b"]', "children[0].never_checkpoint[0]", "field name"),
    ],
)
def test_a_bad_pool_is_refused_naming_the_key(extra: str, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        loads(pool(extra), "tree.toml")
    assert f"tree.toml: {where}" in str(err.value) and says in str(err.value)


def test_a_missing_app_file_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"children\[0\]\.app: no such file"):
        loads(pool(app=tmp_path / "nope.py"), "tree.toml")


def test_the_digest_follows_the_apps_content(tmp_path: Path) -> None:
    app = tmp_path / "agent.py"
    app.write_text("x = 1\n")
    before = digest(app)
    app.write_text("x = 2\n")
    assert digest(app) != before and len(before) == 16


def test_job_outcomes_are_counted_per_pool_with_bounded_labels() -> None:
    from otp_agents.events import Event, Kind
    from otp_agents.ops.metrics import Metrics
    from otp_agents.wire.messages import Report

    metrics = Metrics()
    metrics.on_event(Event(Kind.SUPERVISOR_STARTED, "root/agents/jobs", ts=0.0, detail="simple_one_for_one"))
    for child, outcome in (
        ("job-1", "success"),
        ("job-2", "failed"),
        ("job-3", "failed"),
        ("job-4", "room-7"),
    ):
        metrics.on_report(
            f"root/agents/jobs/{child}", Report(name="agent_jobs_ended", value=1, labels={"outcome": outcome})
        )
    text = metrics.exposition().decode()
    assert 'otp_agents_agent_jobs_total{outcome="failed",path="root/agents/jobs/job"} 2.0' in text
    assert 'otp_agents_agent_jobs_total{outcome="success",path="root/agents/jobs/job"} 1.0' in text
    assert 'outcome="other"' in text and "room-7" not in text  # a stray label value is not a new series


def test_job_failures_by_reason_and_the_resume_gap_are_measured_per_pool() -> None:
    import time

    from otp_agents.events import Event, Kind
    from otp_agents.ops.metrics import Metrics
    from otp_agents.wire.messages import Report

    metrics = Metrics()
    jobs = "root/agents/jobs"
    metrics.on_event(Event(Kind.SUPERVISOR_STARTED, jobs, ts=0.0, detail="simple_one_for_one"))
    for child, reason in (("job-1", "provider"), ("job-2", "provider"), ("job-3", "room-7 broke")):
        failed = Report(name="agent_job_failed", value=1, labels={"reason": reason})
        metrics.on_report(f"{jobs}/{child}", failed)
    # job-4's process died 0.3 s ago; its restart reports listening to the caller again
    metrics.on_event(Event(Kind.CHILD_EXITED, f"{jobs}/job-4", ts=time.time() - 0.3, signal="SIGKILL"))
    metrics.on_report(f"{jobs}/job-4", Report(name="resumed_listening", value=1))
    metrics.on_report(f"{jobs}/job-4", Report(name="resumed_listening", value=1))  # once per death
    # an exit the supervisor asked for is not a death to resume from
    metrics.on_event(Event(Kind.CHILD_EXITED, f"{jobs}/job-5", ts=time.time(), requested=True))
    metrics.on_report(f"{jobs}/job-5", Report(name="resumed_listening", value=1))
    text = metrics.exposition().decode()
    assert f'otp_agents_agent_job_failures_total{{path="{jobs}/job",reason="provider"}} 2.0' in text
    assert f'otp_agents_agent_job_failures_total{{path="{jobs}/job",reason="other"}} 1.0' in text
    assert f'otp_agents_resume_gap_seconds_count{{path="{jobs}/job"}} 1.0' in text
    assert f'otp_agents_resume_gap_seconds_bucket{{le="0.25",path="{jobs}/job"}} 0.0' in text
    assert f'otp_agents_resume_gap_seconds_bucket{{le="0.5",path="{jobs}/job"}} 1.0' in text
