"""Offline by configuration: an unmodified LiveKit Agents app, run with local providers.

LiveKit's apps name cloud providers in their code: ``inference.STT("deepgram/nova-3")``, the
string shorthands (``AgentSession(llm="openai/gpt-4.1-mini")``), or provider plugins
(``from livekit.plugins import deepgram``). With ``--providers offline`` the host installs this
module *before it loads the app*, and every one of those resolves to a local part:

* speech to text: pocketsphinx (:class:`~otp_agents.voice.agents_plugins.SphinxSTT`);
* text to speech: flite, or espeak-ng (:class:`~otp_agents.voice.agents_plugins.FliteTTS`);
* the LLM: the user's OpenAI-compatible server when one is configured (``--llm-url``), else the
  scripted test double (:class:`~otp_agents.voice.agents_script.ScriptedLLM`) when a script is
  given, else the rule LLM;
* end of turn: LiveKit's own ``turn-detector-v1-mini`` audio model, which ships in
  ``livekit-local-inference`` (no gateway);
* noise cancellation plugins (``noise_cancellation``, ``krisp``): nothing (``None``);
* the turn detector plugin (``livekit.plugins.turn_detector``): the same local model.

Provider packages the app imports but that are not installed load as stand-ins, so a missing
optional package does not stop the app from loading; a part of one that has no offline
counterpart fails when it is *built*, naming it. Silero VAD is used as it is (it is local).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otp_agents.errors import OtpAgentsError

log = logging.getLogger("otp_agents.agents")

# Provider plugins whose STT, LLM and TTS need the network; their names are LiveKit's.
CLOUD_PLUGINS = (
    "anthropic",
    "assemblyai",
    "aws",
    "azure",
    "baseten",
    "cartesia",
    "deepgram",
    "elevenlabs",
    "fal",
    "gladia",
    "google",
    "groq",
    "hume",
    "inworld",
    "lmnt",
    "mistralai",
    "neuphonic",
    "nvidia",
    "openai",
    "playai",
    "resemble",
    "rime",
    "sarvam",
    "speechmatics",
    "spitch",
)
SILENT_PLUGINS = ("noise_cancellation", "krisp")  # audio filters: offline, no filter


class OfflineError(OtpAgentsError):
    """Something the app builds has no offline counterpart; the message names it."""


@dataclass(frozen=True)
class Offline:
    """Where each role goes offline."""

    llm_script: Path | None = None  # the scripted test double's script
    llm_url: str | None = None  # a real model: any OpenAI-compatible chat completions server
    llm_model: str = "local"
    voice: str = "kal16"

    def stt(self, *_args: Any, **_kwargs: Any) -> Any:
        from otp_agents.voice.agents_plugins import SphinxSTT

        return SphinxSTT()

    def tts(self, *_args: Any, **_kwargs: Any) -> Any:
        from otp_agents.voice.agents_plugins import FliteTTS

        return FliteTTS(voice=self.voice)

    def llm(self, *_args: Any, **kwargs: Any) -> Any:
        """The configured LLM. A server the app names itself (``openai.LLM(base_url=...)``,
        ``openai.LLM.with_ollama()``, ``$OPENAI_BASE_URL``) is the user's own model: kept, unless
        ``--llm-url`` says otherwise."""
        url, model, key = self.llm_url, self.llm_model, None
        if url is None and isinstance(kwargs.get("base_url"), str) and kwargs["base_url"]:
            url, model = kwargs["base_url"], str(kwargs.get("model") or self.llm_model)
            key = kwargs["api_key"] if isinstance(kwargs.get("api_key"), str) else None
        if url is not None:
            from otp_agents.voice.agents_openai import OpenAICompatibleLLM

            return OpenAICompatibleLLM(url, model, api_key=key)
        if self.llm_script is not None:
            from otp_agents.voice.agents_script import ScriptedLLM

            return ScriptedLLM(self.llm_script)
        from otp_agents.voice.agents_plugins import RuleLLM

        return RuleLLM()

    def openai_llm(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("base_url") and os.environ.get("OPENAI_BASE_URL"):
            kwargs["base_url"] = os.environ["OPENAI_BASE_URL"]
        return self.llm(*args, **kwargs)

    def turn_detector(self, *_args: Any, **kwargs: Any) -> Any:
        from livekit.agents.inference.eot import TurnDetector

        kwargs.pop("version", None)
        kwargs.pop("local_fallback", None)
        return TurnDetector(version="v1-mini", **{k: v for k, v in kwargs.items() if k in _EOT_KWARGS})


_EOT_KWARGS = ("unlikely_threshold", "backchannel_threshold", "sample_rate")
# ``openai.LLM.with_<provider>()`` constructors that mean a server on this machine, and where
# the plugin looks for it; every other one is a cloud provider (the offline LLM instead).
LOCAL_SERVERS = {"with_ollama": "http://localhost:11434/v1"}


def install(offline: Offline) -> list[str]:
    """Make LiveKit Agents resolve its cloud providers to ``offline``'s; returns what was
    replaced, for the log. Call it before the app is loaded (its imports see the stand-ins)."""
    from livekit.agents import inference

    done = []
    inference.STT = _factory("inference.STT", offline.stt)  # type: ignore[misc,assignment]
    inference.TTS = _factory("inference.TTS", offline.tts)  # type: ignore[misc,assignment]
    inference.LLM = _factory("inference.LLM", offline.llm)  # type: ignore[misc,assignment]
    inference.llm_from_model_string = offline.llm
    inference.TurnDetector = _factory("inference.TurnDetector", offline.turn_detector)  # type: ignore[misc,assignment]
    done.append("livekit.agents.inference (STT, LLM, TTS, TurnDetector, model strings)")
    for name in CLOUD_PLUGINS:
        sys.modules[f"livekit.plugins.{name}"] = _plugin(name, offline)
    done.append(f"livekit.plugins: {', '.join(CLOUD_PLUGINS)}")
    for name in SILENT_PLUGINS:
        sys.modules[f"livekit.plugins.{name}"] = _silent(name)
    sys.modules["livekit.plugins.turn_detector"] = _turn_detector_plugin(offline)
    for sub in ("multilingual", "english"):
        sys.modules[f"livekit.plugins.turn_detector.{sub}"] = sys.modules["livekit.plugins.turn_detector"]
    done.append("noise cancellation: none; turn detector plugin: the local v1-mini model")
    sys.meta_path.insert(0, _Unknown(offline))
    return done


def _factory(name: str, build: Callable[..., Any]) -> type:
    """A stand-in class: calling it, or its ``from_model_string``, builds the offline part."""

    class Stand(type):
        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            return build(*args, **kwargs)

        def __getattr__(cls, attr: str) -> Any:
            if not attr.startswith("with_"):  # openai.LLM.with_ollama(), .with_groq(), ...
                raise AttributeError(attr)
            local = LOCAL_SERVERS.get(attr)

            def with_provider(*args: Any, **kwargs: Any) -> Any:
                if local is not None:
                    kwargs.setdefault("base_url", local)
                else:
                    kwargs.pop("base_url", None)
                return build(*args, **kwargs)

            return with_provider

    return Stand(
        name.rsplit(".", 1)[-1], (), {"from_model_string": staticmethod(build), "__qualname__": name}
    )


def _plugin(name: str, offline: Offline) -> types.ModuleType:
    """``livekit.plugins.<name>``: STT, TTS and LLM resolve offline; anything else loads, and
    fails when it is built."""
    module = types.ModuleType(f"livekit.plugins.{name}")
    module.STT = _factory(f"{name}.STT", offline.stt)  # type: ignore[attr-defined]
    module.TTS = _factory(f"{name}.TTS", offline.tts)  # type: ignore[attr-defined]
    llm = offline.openai_llm if name == "openai" else offline.llm
    module.LLM = _factory(f"{name}.LLM", llm)  # type: ignore[attr-defined]

    def missing(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"livekit.plugins.{name}.{attr}")

    setattr(module, "__getattr__", missing)  # noqa: B010 - the module's own __getattr__ (PEP 562)
    module.__path__ = []  # a package: its submodules (openai.realtime) load as stand-ins too
    return module


def _silent(name: str) -> types.ModuleType:
    module = types.ModuleType(f"livekit.plugins.{name}")
    setattr(module, "__getattr__", lambda attr: lambda *a, **k: None)  # noqa: B010
    module.__path__ = []
    return module


def _turn_detector_plugin(offline: Offline) -> types.ModuleType:
    module = types.ModuleType("livekit.plugins.turn_detector")
    for cls in ("MultilingualModel", "EnglishModel"):
        setattr(module, cls, _factory(f"turn_detector.{cls}", offline.turn_detector))
    return module


class _Unavailable:
    """A provider part with no offline counterpart: importing it works, building it says so."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise OfflineError(f"{self._name} has no offline counterpart (providers = offline)")

    def __getattr__(self, attr: str) -> _Unavailable:
        return _Unavailable(f"{self._name}.{attr}")


class _Unknown(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Submodules of the stand-in plugins (``livekit.plugins.openai.realtime``) as stand-ins."""

    def __init__(self, offline: Offline) -> None:
        self._offline = offline

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        parts = fullname.split(".")
        if (
            len(parts) > 3
            and parts[:2] == ["livekit", "plugins"]
            and parts[2] in CLOUD_PLUGINS + SILENT_PLUGINS
        ):
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        plugin = spec.name.split(".")[2]
        if plugin in SILENT_PLUGINS:
            return _silent(plugin)
        return _plugin(spec.name.split(".", 2)[2], self._offline)

    def exec_module(self, module: types.ModuleType) -> None:
        return None
