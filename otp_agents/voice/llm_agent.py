"""An agent backed by a user's LLM: any server that speaks the OpenAI chat-completions protocol
with streaming (OpenAI, vLLM, llama.cpp's server, Ollama, LiteLLM, ...).

The reply streams token by token, so the pipeline speaks the first sentence while the model is
still writing the rest. Failures become :class:`ProviderError` with the kinds the pipeline
retries (connection, timeout, rate_limit, server) or does not (bad_request, auth), so a flaky
model costs a retry and a dead one costs the fallback line, never the call.

Uses aiohttp, so it runs on the asyncio backend (as the voice leaf does).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp

from otp_agents.voice.agent import Session
from otp_agents.voice.providers import ProviderError


class ChatCompletionsAgent:
    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        instructions: str = "You are a helpful voice assistant. Answer in one or two short sentences.",
        max_history: int = 20,
        connect_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.instructions = instructions
        self.max_history = max_history
        self.connect_timeout = connect_timeout

    def messages(self, text: str, session: Session) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.instructions}]
        if session.userdata:
            facts = "; ".join(f"{k}={v}" for k, v in sorted(session.userdata.items()))
            out.append({"role": "system", "content": f"Known about the caller: {facts}"})
        history = session.history[-self.max_history :]
        # The pipeline has already appended the user's turn; do not send it twice.
        if history and history[-1].role == "user" and history[-1].text == text:
            history = history[:-1]
        out += [{"role": m.role, "content": m.text} for m in history]
        out.append({"role": "user", "content": text})
        return out

    async def reply(self, text: str, session: Session) -> AsyncIterator[str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = {"model": self.model, "stream": True, "messages": self.messages(text, session)}
        timeout = aiohttp.ClientTimeout(sock_connect=self.connect_timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.post(self.url, json=body, headers=headers) as resp,
            ):
                if resp.status != 200:
                    detail = (await resp.text())[:200]
                    raise _status_error(self.name, resp.status, detail)
                async for raw in resp.content:
                    line = raw.decode(errors="replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                        delta = chunk["choices"][0].get("delta", {}).get("content") or ""
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise ProviderError(
                            self.name, "bad_response", f"unreadable stream chunk: {exc}", retryable=True
                        ) from None
                    if delta:
                        yield delta
        except aiohttp.ClientConnectionError as exc:
            raise ProviderError(
                self.name, "connection", str(exc) or type(exc).__name__, retryable=True
            ) from None

    def greeting(self, session: Session) -> str | None:
        return None


def _status_error(provider: str, status: int, detail: str) -> ProviderError:
    if status == 429:
        return ProviderError(provider, "rate_limit", f"429 {detail}", retryable=True)
    if status >= 500:
        return ProviderError(provider, "server", f"{status} {detail}", retryable=True)
    if status in (401, 403):
        return ProviderError(provider, "auth", f"{status} {detail}", retryable=False)
    return ProviderError(provider, "bad_request", f"{status} {detail}", retryable=False)
