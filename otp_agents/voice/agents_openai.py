"""A real LLM for a hosted app run offline: any OpenAI-compatible chat-completions server (a
local llama.cpp, vLLM or Ollama server, or OpenAI itself), streamed, with the app's function
tools offered to it and its tool calls handed back to the app. The key, if any, is the one the
app passed, else ``$OPENAI_API_KEY``."""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import aiohttp
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectionError,
    APIConnectOptions,
    APIStatusError,
    NotGivenOr,
    llm,
    utils,
)

Events = Literal["metrics_collected", "error"]


class OpenAICompatibleLLM(llm.LLM[Events]):
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None) -> None:
        super().__init__()
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._api_key = api_key

    @property
    def provider(self) -> str:
        return self._url

    @property
    def model(self) -> str:
        return self._model

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> llm.LLMStream:
        body: dict[str, Any] = {"model": self._model, "stream": True}
        body["messages"], _ = chat_ctx.to_provider_format("openai")
        schemas = llm.ToolContext(tools or []).parse_function_tools("openai") if tools else []
        if schemas:
            body["tools"] = schemas
            if utils.is_given(tool_choice):
                body["tool_choice"] = tool_choice
        return _Stream(self, body, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _Stream(llm.LLMStream):
    def __init__(
        self,
        owner: OpenAICompatibleLLM,
        body: dict[str, Any],
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
    ) -> None:
        super().__init__(owner, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._owner = owner
        self._body = body

    async def _run(self) -> None:
        headers = {"Content-Type": "application/json"}
        if key := self._owner._api_key or os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {key}"
        calls: dict[int, dict[str, str]] = {}
        request_id = utils.shortuuid("chat_")
        timeout = aiohttp.ClientTimeout(total=self._conn_options.timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.post(self._owner._url, json=self._body, headers=headers) as response,
            ):
                if response.status != 200:
                    text = (await response.text())[:500]
                    raise APIStatusError(text, status_code=response.status, body=text)
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    for choice in chunk.get("choices", []):
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            self._event_ch.send_nowait(
                                llm.ChatChunk(
                                    id=request_id,
                                    delta=llm.ChoiceDelta(role="assistant", content=delta["content"]),
                                )
                            )
                        for call in delta.get("tool_calls") or []:
                            slot = calls.setdefault(
                                int(call.get("index", 0)), {"id": "", "name": "", "args": ""}
                            )
                            fn = call.get("function") or {}
                            slot["id"] = call.get("id") or slot["id"]
                            slot["name"] += fn.get("name") or ""
                            slot["args"] += fn.get("arguments") or ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise APIConnectionError(f"{self._owner._url}: {exc}") from exc
        if calls:
            tool_calls = [
                llm.FunctionToolCall(
                    name=c["name"], arguments=c["args"] or "{}", call_id=c["id"] or f"call_{i}"
                )
                for i, c in sorted(calls.items())
            ]
            delta = llm.ChoiceDelta(role="assistant", tool_calls=tool_calls)
            self._event_ch.send_nowait(llm.ChatChunk(id=request_id, delta=delta))
