"""A LiveKit Agents app, loaded once in a zygote so every job's leaf is a fork of it.

``preload = ["otp_agents.voice.agents_zygote:prepare"]`` on a zygote whose environment names
the app (:class:`AppImage`, from ``OTP_AGENTS_APP*`` variables; an ``app`` pool in the tree
sets them). :func:`prepare` does, once, what LiveKit's worker does in its forkserver and in each
job process's start:

1. the offline providers, when asked (before the app's imports see the cloud ones);
2. LiveKit's own warm-up (``livekit.agents.ipc._preload``: the rtc native library, the local
   VAD and end-of-turn weights, the SDKs' lazy imports), shared copy-on-write by every job;
3. the app file, loaded as ``python app.py start`` would (:func:`agents_app.load_app`);
4. the app's prewarm (``setup_fnc``) with a ``JobProcess`` of its own: what it puts in
   ``proc.userdata`` (a VAD, a model) is each job's ``ctx.proc.userdata``;
5. the inference runners the app registered (a turn detector plugin's model), initialized for
   the jobs' ``ctx.inference_executor`` (:mod:`~.agents_inference`).

A zygote forks, so it must stay single-threaded: a Python thread started by any of these steps,
or LiveKit's rtc runtime started before the fork (its Rust runtime's threads would not survive
it), is refused with what started it. Native helper threads that a library parks at load (a
``dlopen``, an ONNX session with one intra-op thread) are not used after the fork: the models
work in the job (the tests run a VAD and the rtc runtime in forked jobs).

A leaf started cold (its zygote down) calls :func:`load` instead: the same steps, in itself.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otp_agents.errors import OtpAgentsError
from otp_agents.voice.agents_inference import RUNNERS
from otp_agents.wire.env import (
    ENV_APP,
    ENV_APP_LLM_MODEL,
    ENV_APP_LLM_SCRIPT,
    ENV_APP_LLM_URL,
    ENV_APP_PROVIDERS,
)

if TYPE_CHECKING:
    from livekit.agents import AgentServer


class UnsafeFork(OtpAgentsError):
    """A step of the preparation left something running that a fork would break."""


@dataclass(frozen=True)
class AppImage:
    """Which app, with which providers: what a zygote of it loads."""

    app: str
    providers: str = "app"  # "app": what its code names; "offline": local ones in their place
    llm_script: str | None = None
    llm_url: str | None = None
    llm_model: str = "local"

    @classmethod
    def from_environ(cls) -> AppImage:
        app = os.environ.get(ENV_APP)
        if not app:
            raise OtpAgentsError(f"{ENV_APP} names no LiveKit Agents app file")
        return cls(
            app=app,
            providers=os.environ.get(ENV_APP_PROVIDERS, "app"),
            llm_script=os.environ.get(ENV_APP_LLM_SCRIPT) or None,
            llm_url=os.environ.get(ENV_APP_LLM_URL) or None,
            llm_model=os.environ.get(ENV_APP_LLM_MODEL) or "local",
        )


@dataclass
class Prepared:
    """The loaded app: its server (options, entrypoint, callbacks) and what its prewarm left."""

    image: AppImage
    server: AgentServer
    userdata: dict[str, Any]
    replaced: list[str]  # what the offline providers stand in for (for the log)


_prepared: Prepared | None = None


def prepare() -> None:
    """The zygote's preload: load the app named by the environment, once, for every fork."""
    global _prepared
    _prepared = load(AppImage.from_environ(), in_zygote=True)


def prepared() -> Prepared | None:
    """The app this process was forked with (None: started cold, or not from an app zygote)."""
    return _prepared


def load(image: AppImage, *, in_zygote: bool = False, prewarm: bool = True) -> Prepared:
    """Steps 1 to 5 above; in a zygote each is checked for what a fork would break."""
    from otp_agents.voice.agents_app import load_app
    from otp_agents.voice.agents_job import check_release

    check_release()
    replaced: list[str] = []
    if image.providers == "offline":
        from otp_agents.voice.agents_offline import Offline, install

        offline = Offline(
            llm_script=Path(image.llm_script) if image.llm_script else None,
            llm_url=image.llm_url,
            llm_model=image.llm_model,
        )
        replaced = install(offline)
        if in_zygote:  # each job's recogniser takes its fork's copy instead of loading the model
            from otp_agents.voice import stt

            _step("the offline recogniser's model", in_zygote, stt.preload)
    _step("LiveKit's warm-up (livekit.agents.ipc._preload)", in_zygote, _warm_up)
    server = _step(f"loading {image.app}", in_zygote, lambda: load_app(image.app, "start"))
    userdata = _step(f"the prewarm of {image.app}", in_zygote, lambda: _prewarm(server)) if prewarm else {}
    _step("the app's inference runners", in_zygote, RUNNERS.initialize_all)
    if in_zygote:
        _step("the job leaf's own modules", in_zygote, _job_code)
    if in_zygote:  # a fork's sys.path[0] becomes its working directory: keep the app's folder
        folder = str(Path(image.app).resolve().parent)
        while folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(1, folder)
    return Prepared(image, server, userdata, replaced)


def _warm_up() -> None:
    importlib.import_module("livekit.agents.ipc._preload")


# What a job's leaf and the dispatcher import after the fork, imported once here instead.
_JOB_MODULES = (
    "otp_agents.voice.agents_leaf",
    "otp_agents.voice.agents_dispatch",
    "livekit.agents.ipc.job_proc_lazy_main",
    "livekit.agents.ipc.proc_client",
    "livekit.agents.utils.aio.duplex_unix",
    "livekit.agents.cli.cli",
    "livekit.agents.cli.tcp_console",
    "livekit.agents.voice.remote_session",
)


def _job_code() -> None:
    for name in _JOB_MODULES:
        importlib.import_module(name)


def _prewarm(server: AgentServer) -> dict[str, Any]:
    from livekit.agents import JobExecutorType, JobProcess

    proc = JobProcess(
        executor_type=JobExecutorType.PROCESS, user_arguments=None, http_proxy=server._http_proxy
    )
    if server.setup_fnc is not None:
        server.setup_fnc(proc)
    return dict(proc.userdata)


def _step(what: str, checked: bool, run: Any) -> Any:
    result = run()
    if checked:
        _check_fork_safe(what)
    return result


def _check_fork_safe(what: str) -> None:
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        raise UnsafeFork(
            f"{what} started a thread ({', '.join(others)}); jobs are forked from this process, "
            "so it must have none: start it in the entrypoint instead"
        )
    ffi = sys.modules.get("livekit.rtc._ffi_client")
    if ffi is not None and getattr(ffi.FfiClient, "_instance", None) is not None:
        raise UnsafeFork(
            f"{what} started LiveKit's rtc runtime (livekit.rtc used before the fork); its threads "
            "would not survive the fork: use livekit.rtc in the entrypoint instead"
        )


__all__ = ["AppImage", "Prepared", "UnsafeFork", "load", "prepare", "prepared"]
