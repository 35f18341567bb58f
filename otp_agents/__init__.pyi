"""Types of the names ``otp_agents/__init__.py`` loads on first use."""

from otp_agents.errors import (
    ChildNotFound,
    ConfigError,
    OtpAgentsError,
    Refused,
    StartAborted,
    StartError,
)
from otp_agents.events import Event, EventBus, Kind
from otp_agents.runtime.tree import Tree, running
from otp_agents.spec.load import from_dict, load_file, loads
from otp_agents.spec.model import (
    Backoff,
    ChildSpec,
    CommandSpec,
    Health,
    RestartType,
    Strategy,
    SupervisorSpec,
    WorkerSpec,
    ZygoteSpec,
)
from otp_agents.tree.supervisor import Supervisor
from otp_agents.worker import Worker, run

__all__ = [
    "Backoff",
    "ChildNotFound",
    "ChildSpec",
    "CommandSpec",
    "ConfigError",
    "Event",
    "EventBus",
    "Health",
    "Kind",
    "OtpAgentsError",
    "Refused",
    "RestartType",
    "StartAborted",
    "StartError",
    "Strategy",
    "Supervisor",
    "SupervisorSpec",
    "Tree",
    "Worker",
    "WorkerSpec",
    "ZygoteSpec",
    "from_dict",
    "load_file",
    "loads",
    "run",
    "running",
]
