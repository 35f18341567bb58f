"""The vocabulary both sides of the wire share: environment variable names, the dump signal,
exit codes and reserved service names. Imported by the supervisor and by the worker library;
imports nothing of the package."""

from __future__ import annotations

import signal

# Set by the supervisor in a protocol worker's environment.
ENV_FD = "OTP_AGENTS_FD"  # the worker's end of its channel (a socketpair), as a file descriptor
ENV_PATH = "OTP_AGENTS_PATH"  # its path in the tree, e.g. root/pool/flaky-1
ENV_BACKEND = "OTP_AGENTS_BACKEND"  # asyncio | trio
ENV_DUMP_FILE = "OTP_AGENTS_DUMP_FILE"  # where faulthandler writes when DUMP_SIGNAL arrives
ENV_SUPERVISOR_PID = "OTP_AGENTS_SUPERVISOR_PID"  # who adopts a zygote's workers

# Protocol workers register this signal with faulthandler; its default action is to be ignored,
# so sending it to a process that never registered it does no harm.
DUMP_SIGNAL = signal.SIGURG

# Exit codes of the worker library.
EXIT_OK = 0
EXIT_CRASH = 1  # main raised
EXIT_NO_SUPERVISOR = 70  # no channel, a refused handshake, or a lost channel
EXIT_NOT_ADOPTED = 70  # a zygote's worker that its supervisor never adopted

# Bye reasons that say nothing beyond the exit status itself.
PLAIN_BYE = frozenset({"normal", "crash"})

SERVICE_PREFIX = "zygote."  # a zygote publishes its fork socket as zygote.<image>
RESERVED_SERVICES = "otp-agents."  # names the runtime itself publishes (its control socket)

# A LiveKit Agents app pool (``app = "agent.py"`` in a tree): what its zygote loads, set by the
# tree on the zygote, its job leaves and its dispatcher (see otp_agents.voice.agents_zygote).
ENV_APP = "OTP_AGENTS_APP"  # the app file
ENV_APP_PROVIDERS = "OTP_AGENTS_APP_PROVIDERS"  # app | offline
ENV_APP_LLM_SCRIPT = "OTP_AGENTS_APP_LLM_SCRIPT"  # offline: the scripted LLM's script
ENV_APP_LLM_URL = "OTP_AGENTS_APP_LLM_URL"  # offline: an OpenAI-compatible server
ENV_APP_LLM_MODEL = "OTP_AGENTS_APP_LLM_MODEL"
ENV_APP_NEVER_KEPT = "OTP_AGENTS_APP_NEVER_KEPT"  # more field names a checkpoint never holds (a,b)
ENV_APP_DIGEST = "OTP_AGENTS_APP_DIGEST"  # on the zygote only: a changed app is a changed zygote
