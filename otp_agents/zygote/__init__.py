"""The zygote: a preloaded Python process that forks ready protocol workers
(``python -m otp_agents.zygote``). It imports only the wire and the worker library."""
