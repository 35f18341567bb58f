"""A protocol worker script that fails at import time, before it can say hello (a bad deploy)."""

import no_such_module_for_otp_agents  # type: ignore[import-not-found]  # noqa: F401
