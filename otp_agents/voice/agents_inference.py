"""The inference a LiveKit Agents job asks its executor for (``ctx.inference_executor``), served
in the job's own leaf.

LiveKit runs the registered inference runners (``_InferenceRunner`` subclasses, e.g. a turn
detector plugin's end-of-utterance model) in one process of its own per worker, and each job
process sends it ``InferenceRequest`` messages. Here a job's leaf answers them itself: each
runner is initialized once in the app's zygote (its model shared copy-on-write by every job) and
run on a worker thread of the leaf, so a slow inference never holds the job's loop. A runner
registered only after the fork is initialized at its first request.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread


class Runners:
    def __init__(self) -> None:
        self._ready: dict[str, Any] = {}

    def initialize_all(self) -> list[str]:
        """Initialize every registered runner now (in the zygote); returns their methods."""
        from livekit.agents.inference_runner import _InferenceRunner

        for method, cls in _InferenceRunner.registered_runners.items():
            if method not in self._ready:
                runner = cls()
                runner.initialize()
                self._ready[method] = runner
        return sorted(self._ready)

    async def run(self, method: str, data: bytes) -> tuple[bytes | None, str | None]:
        """(result, None), or (None, why it failed)."""
        from livekit.agents.inference_runner import _InferenceRunner

        runner = self._ready.get(method)
        try:
            if runner is None:
                cls = _InferenceRunner.registered_runners.get(method)
                if cls is None:
                    return None, f"no inference runner is registered for {method!r}"
                runner = cls()
                await anyio.to_thread.run_sync(runner.initialize)
                self._ready[method] = runner
            result = await anyio.to_thread.run_sync(runner.run, data)
        except Exception as exc:
            return None, f"inference {method!r} failed: {type(exc).__name__}: {exc}"
        return result, None


RUNNERS = Runners()  # this process's: the zygote fills it, its forks inherit it

__all__ = ["RUNNERS", "Runners"]
