"""Side-effect module for a hosted LiveKit worker's forkserver (see
:mod:`otp_agents.voice.agents_worker_jobs`): installs the offline providers configured in
``OTP_AGENTS_OFFLINE`` before any job process imports the app, so each inherits them."""

from __future__ import annotations

from otp_agents.voice.agents_offline import install
from otp_agents.voice.agents_worker_jobs import offline_from_env

_offline = offline_from_env()
if _offline is not None:
    install(_offline)
