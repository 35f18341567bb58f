"""``python -m otp_agents.worker package.module:function [args...]``: how the supervisor starts a
``module = ...`` protocol worker."""

from otp_agents.worker.entry import main

main()
