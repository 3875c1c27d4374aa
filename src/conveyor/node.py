"""One Conveyor process: the bundled broker if needed, the stages, the projector, the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from conveyor.backends import open_log, open_store
from conveyor.config import STAGES, ModelSettings, Settings
from conveyor.embedded import EmbeddedNats
from conveyor.errors import UnavailableError
from conveyor.events import Topic, background_topic, prepared_topic
from conveyor.gateway.app import create_app
from conveyor.gateway.auth import Keys, KeysFile
from conveyor.gateway.core import GatewayLimits
from conveyor.gateway.ratelimit import Rate
from conveyor.log.base import EventLog
from conveyor.models.base import ModelBackend, ModelInfo
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
from conveyor.usage import Price


def model_info(settings: ModelSettings, model: ModelBackend) -> ModelInfo:
    """What every event the model produced carries: the backend's own, overridden by settings."""
    own = model.info
    return ModelInfo(
        name=settings.id,
        version=settings.version or own.version,
        license=settings.license or own.license,
    )


def build_model(settings: ModelSettings, data_dir: Path) -> ModelBackend:
    """The model ``settings`` describe; those without tool calling of their own get it by prompt."""
    if settings.backend == "simulated":
        return PromptedTools(SimulatedModel(ttft=settings.ttft, token_delay=settings.token_delay))
    if settings.backend == "local":
        from conveyor.models.local import LocalModel  # needs the "local" extra

        return PromptedTools(
            LocalModel(
                cache_dir=data_dir / "models",
                slots=settings.slots,
                context_per_slot=settings.context,
                prefix_cache=settings.prefix_cache,
                weights=settings.weights,
            )
        )
    if settings.backend == "openai":
        from conveyor.models.openai_compat import OpenAICompatModel

        if not settings.upstream_url or not settings.upstream_model:
            raise ValueError("--model openai needs --upstream-url and --upstream-model")
        api_key = os.environ.get("CONVEYOR_UPSTREAM_API_KEY")  # a secret: environment only
        return OpenAICompatModel(
            base_url=settings.upstream_url, model=settings.upstream_model, api_key=api_key
        )
    raise ValueError(f"unknown model {settings.backend!r}; available: local, openai, simulated")


async def build_models(settings: Settings) -> dict[str, ModelBackend]:
    """The backends of the models this process generates for, by id; closed again if one fails."""
    built: dict[str, ModelBackend] = {}
    try:
        for model in settings.generated_here:
            built[model.id] = build_model(model, settings.data_dir)
    except BaseException:
        for backend in built.values():
            await backend.close()
        raise
    return built


def prices(settings: Settings) -> dict[str, Price]:
    """The price of each model served that has one, by the name its events carry."""
    return {
        model.id: Price(model.price_prompt, model.price_completion, model.price_cached)
        for model in settings.served
        if model.price_prompt or model.price_completion or model.price_cached
    }


def build_pipeline(
    settings: Settings,
    models: Mapping[str, ModelBackend],
    cancels: CancelWatch,
    *,
    stages: Collection[str] = STAGES,
) -> Pipeline:
    """The ``stages`` named (every one by default), "generate" being a generate stage for each of
    ``models`` (by id). Requests for the default model wait on [prepared], for another on its own
    topic (``prepared_topic``), so each model's generate stage is consumed and scaled on its own."""
    served = {model.id: model for model in settings.served}
    generates = [
        generate_stage(
            backend,
            cancels,
            info=model_info(served[name], backend),
            batching=BatchPolicy(
                max_size=served[name].batch_max_size,
                max_wait=served[name].batch_max_wait,
                target_latency=served[name].batch_target_latency,
            ),
            route=_route(settings, name),
            background=served[name].background,
            fallback=_route(settings, served[name].fallback) if served[name].fallback else None,
            cache=served[name].cache,
        )
        for name, backend in models.items()
        if "generate" in stages
    ]
    # The secret that signs callbacks: the environment only, like every secret.
    secret = os.environ.get("CONVEYOR_CALLBACK_SECRET", "")
    routes = {model.id: _route(settings, model.id) for model in settings.served}
    chosen = [
        prepare_stage(SafetyPolicy(settings.blocklist), routes=routes) if "prepare" in stages else None,
        *generates,
        finalize_stage(prices(settings)) if "finalize" in stages else None,
        deliver_stage(hosts=settings.callback_hosts, secret=secret) if "deliver" in stages else None,
        Projector(default_model=settings.model.id).stage(also=_waiting_topics(routes.values()))
        if "projector" in stages
        else None,
    ]
    return Pipeline([stage for stage in chosen if stage is not None])


def _waiting_topics(routes: Iterable[str]) -> list[str]:
    """Where prepared requests wait besides [prepared]: each other model's topic, and each model's
    background topic."""
    topics = [prepared_topic(route) for route in routes]
    return [topic for topic in topics if topic != Topic.PREPARED] + [background_topic(t) for t in topics]


def _route(settings: Settings, model: str) -> str:
    """What a request's events name as its model: nothing for the default one."""
    return "" if model == settings.model.id else model


def gateway_options(settings: Settings) -> tuple[GatewayLimits, Keys | None]:
    """The gateway's limits and API keys from ``settings`` (ValueError, naming the setting, if wrong)."""
    if settings.rate_burst is not None and not settings.rate_limit:
        raise ValueError("--rate-burst needs --rate-limit")
    if settings.max_backlog is not None and settings.max_backlog < 0:
        raise ValueError(f"--max-backlog must be 0 or more, not {settings.max_backlog}")
    rate = Rate.of(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None
    keys = KeysFile(settings.api_keys_file) if settings.api_keys_file else None
    if settings.token_limit is not None and settings.token_limit < 1:
        raise ValueError(f"--token-limit must be 1 or more tokens per minute, not {settings.token_limit}")
    if settings.budget is not None and settings.budget <= 0:
        raise ValueError(f"--budget must be above 0 USD a month, not {settings.budget}")
    if settings.max_parallel is not None and settings.max_parallel < 1:
        raise ValueError(f"--max-parallel must be 1 or more requests, not {settings.max_parallel}")
    limits = GatewayLimits(
        rate=rate,
        max_backlog=settings.max_backlog,
        callback_hosts=settings.callback_hosts,
        tokens_per_minute=settings.token_limit,
        max_parallel=settings.max_parallel,
        budget=settings.budget,
        max_body_bytes=settings.body_limit,
        max_prompt_chars=settings.body_limit,  # a prompt is as long as the body may carry
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
        log_config=None,  # its messages go where the process's go (observability/logs.py)
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
    log = await open_log(
        log_url,
        prefix=settings.prefix,
        ack_wait=settings.ack_wait,
        blob_url=settings.blobs_for(log_url),
        max_event_bytes=settings.max_event_bytes,
    )
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
        # Only a process that generates loads the models (the gateway, for one, never does).
        models = await build_models(settings) if "generate" in local_stages else {}
        cancels = CancelWatch(log)
        pipeline = build_pipeline(settings, models, cancels, stages=local_stages)
        workers = [StageWorker(stage, log, store, heartbeat=settings.ack_wait / 3) for stage in pipeline]
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
                    ids = [model.id for model in settings.served]
                    app = create_app(
                        log,
                        store,
                        limits=limits,
                        keys=keys,
                        models=ids,
                        aliases=settings.aliases,
                        access_log=settings.access_log,
                        alias_routing=settings.alias_routing,
                    )
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
            for backend in models.values():
                await backend.close()
