"""One Conveyor process: the bundled broker if needed, the stages, the projector, the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from conveyor.backends import open_log, open_store
from conveyor.config import Settings
from conveyor.embedded import EmbeddedNats
from conveyor.errors import UnavailableError
from conveyor.gateway.app import create_app
from conveyor.gateway.auth import ApiKeys
from conveyor.gateway.core import GatewayLimits
from conveyor.gateway.ratelimit import Rate
from conveyor.log.base import EventLog
from conveyor.models.base import MODEL_IDS, ModelBackend, ModelInfo
from conveyor.models.simulated import SimulatedModel
from conveyor.models.tools import PromptedTools
from conveyor.observability.metrics import REGISTRY
from conveyor.pipeline import BatchPolicy, Pipeline
from conveyor.projector import Projector
from conveyor.runtime.worker import StageWorker
from conveyor.stages import (
    CancelWatch,
    SafetyPolicy,
    deliver_stage,
    finalize_stage,
    generate_stage,
    prepare_stage,
)
from conveyor.store.base import StateStore
from conveyor.supervisor import WorkerProcesses


def model_id(settings: Settings) -> str:
    """The id clients use for the configured model in the OpenAI-compatible API."""
    if settings.model.name:
        return settings.model.name
    if settings.model.backend == "openai":
        return settings.model.upstream_model
    return MODEL_IDS.get(settings.model.backend, settings.model.backend)


def model_info(settings: Settings, model: ModelBackend) -> ModelInfo:
    """What every event the model produced carries: the backend's own, overridden by settings."""
    own = model.info
    return ModelInfo(
        name=model_id(settings),
        version=settings.model.version or own.version,
        license=settings.model.license or own.license,
    )


def build_model(settings: Settings) -> ModelBackend:
    """The model of ``--model``; those without tool calling of their own get it by prompt."""
    if settings.model.backend == "simulated":
        return PromptedTools(SimulatedModel(ttft=settings.model.ttft, token_delay=settings.model.token_delay))
    if settings.model.backend == "local":
        from conveyor.models.local import LocalModel  # needs the "local" extra

        local = settings.model
        return PromptedTools(
            LocalModel(
                cache_dir=settings.data_dir / "models",
                slots=local.slots,
                context_per_slot=local.context,
                prefix_cache=local.prefix_cache,
                weights=local.weights,
            )
        )
    if settings.model.backend == "openai":
        from conveyor.models.openai_compat import OpenAICompatModel

        if not settings.model.upstream_url or not settings.model.upstream_model:
            raise ValueError("--model openai needs --upstream-url and --upstream-model")
        api_key = os.environ.get("CONVEYOR_UPSTREAM_API_KEY")  # a secret: environment only
        return OpenAICompatModel(
            base_url=settings.model.upstream_url, model=settings.model.upstream_model, api_key=api_key
        )
    raise ValueError(f"unknown model {settings.model.backend!r}; available: local, openai, simulated")


def build_pipeline(settings: Settings, model: ModelBackend | None, cancels: CancelWatch) -> Pipeline:
    """Every stage; without a model (a process that does not run ``generate``), all but that one."""
    generate = (
        generate_stage(
            model,
            cancels,
            info=model_info(settings, model),
            batching=BatchPolicy(
                max_size=settings.model.batch_max_size,
                max_wait=settings.model.batch_max_wait,
                target_latency=settings.model.batch_target_latency,
            ),
        )
        if model is not None
        else None
    )
    # The secret that signs callbacks: the environment only, like every secret.
    secret = os.environ.get("CONVEYOR_CALLBACK_SECRET", "")
    stages = [
        prepare_stage(SafetyPolicy(settings.blocklist)),
        generate,
        finalize_stage(),
        deliver_stage(hosts=settings.callback_hosts, secret=secret),
        Projector().stage(),
    ]
    return Pipeline([stage for stage in stages if stage is not None])


def gateway_options(settings: Settings) -> tuple[GatewayLimits, ApiKeys | None]:
    """The gateway's limits and API keys from ``settings`` (ValueError, naming the setting, if wrong)."""
    if settings.rate_burst is not None and not settings.rate_limit:
        raise ValueError("--rate-burst needs --rate-limit")
    if settings.max_backlog is not None and settings.max_backlog < 0:
        raise ValueError(f"--max-backlog must be 0 or more, not {settings.max_backlog}")
    rate = Rate.of(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None
    keys = ApiKeys.load(settings.api_keys_file) if settings.api_keys_file else None
    limits = GatewayLimits(
        rate=rate, max_backlog=settings.max_backlog, callback_hosts=settings.callback_hosts
    )
    return limits, keys


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, sock: socket.socket) -> AsyncIterator[str]:
    """Serve ``app`` on the bound ``sock`` while inside; yields its URL."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        # Longer than clients' and load balancers' own idle timeouts (aiohttp 15 s, AWS ALB 60 s), so
        # that they close an idle connection first: with uvicorn's 5 s, a client reusing one as the
        # gateway closes it gets a reset (130-190 of 3,200 SSE requests at 400/s on Kafka, benchmarks).
        timeout_keep_alive=75,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            raise RuntimeError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    host, port = sock.getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task


def ops_app() -> Starlette:
    """What a worker process serves on ``--metrics-port``: its own metrics and liveness."""

    async def metrics(_: Request) -> PlainTextResponse:
        return PlainTextResponse(REGISTRY.render(), media_type="text/plain; version=0.0.4")

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/metrics", metrics), Route("/healthz", healthz)])


@contextlib.asynccontextmanager
async def backends(settings: Settings) -> AsyncIterator[tuple[EventLog, StateStore, str]]:
    """The log and the store of ``settings``, starting the bundled NATS server if none is named."""
    server: EmbeddedNats | None = None
    log_url = settings.log_url
    if log_url is None:
        server = await EmbeddedNats.start(settings.data_dir / "nats")
        log_url = server.url
    store_url = settings.store_url or log_url
    if store_url.startswith("kafka:"):  # NATS brings its key-value store along; Kafka has none
        raise ValueError("a kafka:// log needs a state store: --store-url redis://HOST:PORT/0 (or nats://…)")
    log = await open_log(log_url, prefix=settings.prefix, ack_wait=settings.ack_wait)
    store = await open_store(store_url, prefix=settings.prefix)
    try:
        yield log, store, log_url
    finally:
        await log.close()
        await store.close()
        if server is not None:
            await server.stop()


async def _unless_a_stage_ends(waiting: Awaitable[object], stages: list[asyncio.Task[None]]) -> None:
    """Await ``waiting``; a stage that ends on its own first is a fault: raise it, so the process
    exits (and a supervisor restarts it) instead of living on without that stage."""
    waited = asyncio.ensure_future(waiting)
    try:
        done, _ = await asyncio.wait([waited, *stages], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waited.cancel()
    for task in done:
        if task is not waited:
            error = task.exception()
            raise UnavailableError(f"{task.get_name()} stopped: {error!r}") from error


async def _unless_stopped(waiting: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await ``waiting`` (and its errors) unless ``stop`` is set first; whether it finished."""
    waited, stopped = asyncio.ensure_future(waiting), asyncio.ensure_future(stop.wait())
    await asyncio.wait([waited, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not waited.done():
        waited.cancel()
        return False
    await waited
    return True


def bind(host: str, port: int) -> socket.socket:
    """Bind a listening port first, so a taken port fails before anything else starts."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UnavailableError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


async def run_node(
    settings: Settings,
    stop: asyncio.Event,
    *,
    gateway: bool = True,
    worker_processes: int = 0,
    on_ready: Callable[[str, str, list[str]], None] = lambda gateway_url, log_url, metrics_urls: None,
) -> None:
    """Run until ``stop`` is set; then stop accepting, drain in-flight work and shut down.

    With ``worker_processes`` the stages run in that many child processes (each with
    every stage of ``settings.stages``) and the projector here; otherwise all of them run
    here, in this event loop.
    """
    # Read before anything starts, so a bad keys file or limit fails at once with its reason.
    limits, keys = gateway_options(settings) if gateway else (GatewayLimits(), None)
    sock = bind(settings.host, settings.port) if gateway else None
    metrics_sock = bind(settings.host, settings.metrics_port) if settings.metrics_port is not None else None
    async with backends(settings) as (log, store, log_url):
        # With worker processes, the projector stays here, beside the gateway: serving HTTP leaves
        # this process CPU to spare, while the stages need all of theirs (benchmarks/README.md).
        local_stages: tuple[str, ...] = settings.stages
        child_stages: tuple[str, ...] = ()
        if worker_processes:
            local_stages = tuple(stage for stage in settings.stages if stage == "projector")
            child_stages = tuple(stage for stage in settings.stages if stage != "projector")
        # Only a process that generates loads the model (the gateway, for one, never does).
        model = build_model(settings) if "generate" in local_stages else None
        cancels = CancelWatch(log)
        pipeline = build_pipeline(settings, model, cancels)
        workers = [
            StageWorker(pipeline[name], log, store, heartbeat=settings.ack_wait / 3) for name in local_stages
        ]
        worker_stop = asyncio.Event()
        tasks = [asyncio.create_task(w.run(worker_stop), name=f"stage-{w.stage.name}") for w in workers]
        helpers: list[asyncio.Task[None]] = []
        if "generate" in local_stages:
            helpers.append(asyncio.create_task(cancels.run(), name="cancel-watch"))
        children = None
        if child_stages:
            env = settings.to_env() | {"CONVEYOR_LOG_URL": log_url}
            children = WorkerProcesses(worker_processes, child_stages, env)
            helpers.append(asyncio.create_task(children.run(), name="worker-processes"))
        gateway_url = ""
        try:
            await _unless_a_stage_ends(asyncio.gather(*(w.ready.wait() for w in workers)), tasks)
            async with contextlib.AsyncExitStack() as http:
                if metrics_sock is not None:
                    await http.enter_async_context(serving(ops_app(), metrics_sock))
                if sock is not None:
                    app = create_app(log, store, limits=limits, keys=keys, models=[model_id(settings)])
                    gateway_url = await http.enter_async_context(serving(app, sock))
                ports = children.metrics_ports if children else []
                if metrics_sock is not None:
                    ports = [metrics_sock.getsockname()[1], *ports]
                metrics_urls = [f"http://{settings.host}:{p}/metrics" for p in ports]
                if children is not None and not await _unless_stopped(children.ready(), stop):
                    return  # stopped while the worker processes were starting
                on_ready(gateway_url, log_url, metrics_urls)
                await _unless_a_stage_ends(stop.wait(), tasks)
        finally:
            if children is not None:
                await children.stop()
            worker_stop.set()
            _, pending = await asyncio.wait(tasks, timeout=30) if tasks else (set(), set())
            for task in (*pending, *helpers):
                task.cancel()
            await asyncio.gather(*tasks, *helpers, return_exceptions=True)
            if model is not None:
                await model.close()
