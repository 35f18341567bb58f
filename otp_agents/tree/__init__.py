"""The OTP engine. ``rules`` decides what happens when a child dies (pure functions); ``supervisor``
carries it out, one mailbox per supervisor; ``startup`` and ``operations`` are a supervisor's start
and its operator requests; ``ports`` is all it needs from the world (a host that spawns, a handle
per process). It never imports the process layer."""
