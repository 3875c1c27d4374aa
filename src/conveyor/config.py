"""Settings shared by every command: flags override ``CONVEYOR_*`` environment variables."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor.callbacks import LOOPBACK
from conveyor.events import model_token
from conveyor.models.base import MODEL_IDS
from conveyor.stages.prepare import DEFAULT_BLOCKLIST

STAGES = ("prepare", "generate", "finalize", "deliver", "projector")
# How an alias picks a model for a request (GatewayCore._pick).
ALIAS_ROUTING = ("weight", "backlog")
# The local model's weight types (conveyor.models.local.WEIGHTS says what each one is).
LOCAL_WEIGHTS = ("q8_0", "f16", "shipped")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelSettings:
    backend: str = "local"  # SmolLM2 on the CPU; "simulated" answers instantly; "openai" an upstream
    # How the model is known: the id clients ask for and what every event it produced carries
    # (empty: the backend's own name, version and license).
    name: str = ""
    version: str = ""
    license: str = ""
    ttft: float = 0.0
    token_delay: float = 0.0
    upstream_url: str = ""  # --model openai: the server's /v1 base URL
    upstream_model: str = ""  # --model openai: the model name the server knows
    # --model local: requests generated at once, tokens per request (prompt + output), whether
    # a freed slot's KV cache serves the next request with the same prompt start, and the weight
    # type (conveyor.models.local.WEIGHTS).
    slots: int = 16
    context: int = 1024
    prefix_cache: bool = True
    weights: str = "q8_0"
    # Background requests (positive priority: a batch's) generating at once per worker, at most.
    background: int = 4
    # The id of a model served beside it that answers the requests it fails (its retries spent).
    fallback: str = ""
    # Seconds a deterministic answer is kept to answer the same request again (0: not kept).
    cache: float = 0.0
    # USD per million tokens, recorded with each request's usage (conveyor.usage.Price): prompt
    # tokens, completion tokens, and prompt tokens found in the model's cache (None: as prompt).
    price_prompt: float = 0.0
    price_completion: float = 0.0
    price_cached: float | None = None
    # Dynamic batching of generate requests (see conveyor.pipeline.BatchPolicy).
    batch_max_size: int = 16
    batch_max_wait: float = 0.0
    batch_target_latency: float | None = None

    def __post_init__(self) -> None:
        if self.weights not in LOCAL_WEIGHTS:
            raise ValueError(f"unknown model weights {self.weights!r}; available: {', '.join(LOCAL_WEIGHTS)}")
        if not 0 <= self.cache <= 7 * 86_400:  # the store keeps answers a week at most
            raise ValueError(f"a model's cache must keep answers 0 to 604800 seconds, not {self.cache}")
        if self.background < 1:
            raise ValueError(f"a model's background limit must be 1 or more, not {self.background}")
        if min(self.price_prompt, self.price_completion, self.price_cached or 0.0) < 0:
            raise ValueError("a model's prices must be 0 or more")

    @property
    def id(self) -> str:
        """The id clients ask for: ``name``, else the upstream's model name or the backend's own."""
        if self.name:
            return self.name
        if self.backend == "openai":
            return self.upstream_model
        return MODEL_IDS.get(self.backend, self.backend)

    @classmethod
    def of(cls, fields: Mapping[str, Any]) -> ModelSettings:
        """A model from a table of its fields by name (``[[models]]`` in a config file)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"a model's unknown settings {unknown}; known: {sorted(known)}")
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ValueError(f"a model's settings are wrong: {exc}") from exc

    def to_fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".conveyor")
    log_url: str | None = None  # None: start the bundled NATS server in data_dir
    store_url: str | None = None  # None: the same NATS server's key-value store
    # Where event payloads over max_event_bytes go (log/claim_check.py). None: a NATS log's own
    # object store; a Kafka log has none, and the gateway then takes bodies of 256 KiB at most.
    blob_url: str | None = None
    max_event_bytes: int = 64 * 1024
    prefix: str = "conveyor"
    # Seconds before the broker redelivers an event whose worker went silent. Live workers
    # send heartbeats for long handlers, so this bounds recovery time after a crash.
    ack_wait: float = 10.0
    metrics_port: int | None = None  # worker processes: serve /metrics here (0 picks a free port)
    log_level: str = "warning"  # of the processes' own messages (observability/logs.py)
    log_format: str = "text"  # or "json", a line each
    model: ModelSettings = ModelSettings()
    # More models served beside ``model`` (the default: a request that names none gets it);
    # a request names one by its id, and waits for it on a topic of its own.
    models: tuple[ModelSettings, ...] = ()
    # The models whose requests this process generates, by id (empty: every one it serves).
    serve: tuple[str, ...] = ()
    # Names that spread requests over served models by weight (a canary, several upstreams of one
    # model): alias -> ((model id, weight), ...).
    aliases: Mapping[str, tuple[tuple[str, float], ...]] = dataclasses.field(default_factory=dict)
    alias_routing: str = "weight"  # one of ALIAS_ROUTING
    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST
    stages: tuple[str, ...] = STAGES
    # The gateway: with a keys file (lines key=tenant) every API request needs a key; without
    # one, every request is tenant "default".
    api_keys_file: Path | None = None
    rate_limit: float | None = None  # submits per second per tenant (None or 0: no limit)
    rate_burst: float | None = None  # submits at once (None: max(1, rate_limit))
    max_backlog: int | None = None  # refuse submits while prepare is further behind (None: never)
    token_limit: int | None = None  # tokens per minute per tenant, counted as used (None: no limit)
    max_parallel: int | None = None  # requests under way per tenant, per gateway (None: no limit)
    budget: float | None = None  # USD per tenant and calendar month at the models' prices (None: none)
    max_body_bytes: int | None = None  # of a request (None: 8 MiB with a blob store, else 256 KiB)
    access_log: bool = False  # a line per HTTP call (gateway/access.py)
    # The hosts a request's callback_url may name (conveyor.callbacks); empty: no callbacks.
    callback_hosts: tuple[str, ...] = LOOPBACK

    def __post_init__(self) -> None:
        ids = [m.id for m in self.served]
        if len(set(ids)) != len(ids) or len({model_token(i) for i in ids}) != len(ids):
            raise ValueError(f"the models served need distinct ids (up to case and punctuation), not {ids}")
        if any(not model_token(m.id) for m in self.models):  # it names their topic (the default's is fixed)
            raise ValueError(
                f"each model served beside the default needs an id with a letter or a digit: {ids}"
            )
        if unknown := sorted(set(self.serve) - set(ids)):
            raise ValueError(f"--serve names models not served here: {unknown}; served: {ids}")
        if self.alias_routing not in ALIAS_ROUTING:
            raise ValueError(f"alias routing is {' or '.join(ALIAS_ROUTING)}, not {self.alias_routing!r}")
        for alias, targets in self.aliases.items():
            if alias in ids or not model_token(alias):
                raise ValueError(f"an alias needs a name of its own, not {alias!r}; models: {ids}")
            if not targets or any(model not in ids or not weight > 0 for model, weight in targets):
                raise ValueError(f"alias {alias!r}: give served models with weights above 0, not {targets}")
        fallbacks = {m.id: m.fallback for m in self.served if m.fallback}
        if unknown := sorted(set(fallbacks.values()) - set(ids)):
            raise ValueError(f"a fallback names models not served here: {unknown}; served: {ids}")
        for start in fallbacks:  # each chain of fallbacks ends: a request is never passed around
            seen, at = [start], fallbacks[start]
            while at in fallbacks and at not in seen:
                seen.append(at)
                at = fallbacks[at]
            if at in seen:
                raise ValueError(f"the fallbacks go round in a circle: {' -> '.join([*seen, at])}")

    def blobs_for(self, log_url: str) -> str | None:
        """The blob store of a deployment whose log is at ``log_url``: ``blob_url``, else a NATS
        log's own object store (a Kafka log brings none)."""
        return self.blob_url or (log_url if log_url.startswith("nats:") else None)

    @property
    def body_limit(self) -> int:
        """The largest request body the gateway takes, in bytes."""
        # No log URL: the bundled NATS server, which brings its object store.
        has_blobs = self.log_url is None or self.blobs_for(self.log_url) is not None
        return self.max_body_bytes or (8 * 1024 * 1024 if has_blobs else 256 * 1024)

    @property
    def served(self) -> tuple[ModelSettings, ...]:
        """Every model of the deployment, the default first."""
        return (self.model, *self.models)

    @property
    def generated_here(self) -> tuple[ModelSettings, ...]:
        """The models this process generates for (``serve``, or all of them)."""
        return tuple(m for m in self.served if not self.serve or m.id in self.serve)

    @classmethod
    def load(cls, config: Path | None = None, env: Mapping[str, str] = os.environ) -> Settings:
        """Settings from the environment over the TOML file ``config`` (or ``$CONVEYOR_CONFIG``).

        The file uses the environment's names without the prefix, in lower case
        (``log_url = "nats://…"``, ``batch_max_size = 8``, ``blocklist = ["…"]``), so one
        deployment can keep its settings in a file and override a few per process.
        """
        path = config or (Path(env["CONVEYOR_CONFIG"]) if env.get("CONVEYOR_CONFIG") else None)
        return cls.from_env({**_read_config(path), **env} if path else env)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def get(name: str) -> str | None:
            return env.get(f"CONVEYOR_{name}") or None

        base = cls()
        target = get("BATCH_TARGET_LATENCY")
        model = ModelSettings(
            backend=get("MODEL") or base.model.backend,
            name=get("MODEL_NAME") or "",
            version=get("MODEL_VERSION") or "",
            license=get("MODEL_LICENSE") or "",
            ttft=float(get("MODEL_TTFT") or base.model.ttft),
            token_delay=float(get("MODEL_TOKEN_DELAY") or base.model.token_delay),
            upstream_url=get("UPSTREAM_URL") or "",
            upstream_model=get("UPSTREAM_MODEL") or "",
            slots=int(get("MODEL_SLOTS") or base.model.slots),
            context=int(get("MODEL_CONTEXT") or base.model.context),
            prefix_cache=_flag(get("PREFIX_CACHE"), base.model.prefix_cache),
            weights=get("MODEL_WEIGHTS") or base.model.weights,
            background=int(get("MODEL_BACKGROUND") or base.model.background),
            fallback=get("MODEL_FALLBACK") or "",
            cache=float(get("MODEL_CACHE") or base.model.cache),
            price_prompt=float(get("MODEL_PRICE_PROMPT") or base.model.price_prompt),
            price_completion=float(get("MODEL_PRICE_COMPLETION") or base.model.price_completion),
            price_cached=float(cached) if (cached := get("MODEL_PRICE_CACHED")) is not None else None,
            batch_max_size=int(get("BATCH_MAX_SIZE") or base.model.batch_max_size),
            batch_max_wait=float(get("BATCH_MAX_WAIT") or base.model.batch_max_wait),
            batch_target_latency=float(target) if target is not None else None,
        )
        models = get("MODELS")
        blocklist = env.get("CONVEYOR_BLOCKLIST")  # may be set and empty: no blocklist
        hosts = env.get("CONVEYOR_CALLBACK_HOSTS")  # likewise: no callbacks
        names = ("API_KEYS_FILE", "RATE_LIMIT", "RATE_BURST", "MAX_BACKLOG", "TOKEN_LIMIT", "MAX_PARALLEL")
        keys_file, rate, burst, backlog, tokens, parallel = (get(n) for n in names)
        budget, body = get("BUDGET"), get("MAX_BODY_BYTES")
        return cls(
            host=get("HOST") or base.host,
            port=int(get("PORT") or base.port),
            data_dir=Path(get("DATA_DIR") or base.data_dir),
            log_url=get("LOG_URL"),
            store_url=get("STORE_URL"),
            blob_url=get("BLOB_URL"),
            max_event_bytes=int(get("MAX_EVENT_BYTES") or base.max_event_bytes),
            prefix=get("PREFIX") or base.prefix,
            log_level=get("LOG_LEVEL") or base.log_level,
            log_format=get("LOG_FORMAT") or base.log_format,
            ack_wait=float(get("ACK_WAIT") or base.ack_wait),
            metrics_port=int(port) if (port := get("METRICS_PORT")) is not None else None,
            model=model,
            models=tuple(ModelSettings.of(m) for m in _models(models)) if models else (),
            serve=_phrases(get("SERVE") or ""),
            aliases=_aliases(get("ALIASES") or "{}"),
            alias_routing=get("ALIAS_ROUTING") or base.alias_routing,
            blocklist=_phrases(blocklist) if blocklist is not None else base.blocklist,
            api_keys_file=Path(keys_file) if keys_file is not None else None,
            rate_limit=float(rate) if rate is not None else None,
            rate_burst=float(burst) if burst is not None else None,
            max_backlog=int(backlog) if backlog is not None else None,
            token_limit=int(tokens) if tokens is not None else None,
            max_parallel=int(parallel) if parallel is not None else None,
            budget=float(budget) if budget is not None else None,
            max_body_bytes=int(body) if body is not None else None,
            access_log=_flag(get("ACCESS_LOG"), base.access_log),
            callback_hosts=_phrases(hosts) if hosts is not None else base.callback_hosts,
        )

    def to_env(self) -> dict[str, str]:
        """These settings as the environment that ``from_env`` reads (for child processes)."""
        env = {
            "CONVEYOR_HOST": self.host,
            "CONVEYOR_PORT": str(self.port),
            "CONVEYOR_DATA_DIR": str(self.data_dir),
            "CONVEYOR_PREFIX": self.prefix,
            "CONVEYOR_ACK_WAIT": repr(self.ack_wait),
            "CONVEYOR_MAX_EVENT_BYTES": str(self.max_event_bytes),
            "CONVEYOR_ACCESS_LOG": "true" if self.access_log else "false",
            "CONVEYOR_ALIAS_ROUTING": self.alias_routing,
            "CONVEYOR_MODEL": self.model.backend,
            "CONVEYOR_MODEL_NAME": self.model.name,
            "CONVEYOR_MODEL_VERSION": self.model.version,
            "CONVEYOR_MODEL_LICENSE": self.model.license,
            "CONVEYOR_MODEL_TTFT": repr(self.model.ttft),
            "CONVEYOR_MODEL_TOKEN_DELAY": repr(self.model.token_delay),
            "CONVEYOR_UPSTREAM_URL": self.model.upstream_url,
            "CONVEYOR_UPSTREAM_MODEL": self.model.upstream_model,
            "CONVEYOR_MODEL_SLOTS": str(self.model.slots),
            "CONVEYOR_MODEL_CONTEXT": str(self.model.context),
            "CONVEYOR_PREFIX_CACHE": "true" if self.model.prefix_cache else "false",
            "CONVEYOR_MODEL_WEIGHTS": self.model.weights,
            "CONVEYOR_MODEL_BACKGROUND": str(self.model.background),
            "CONVEYOR_MODEL_FALLBACK": self.model.fallback,
            "CONVEYOR_MODEL_CACHE": repr(self.model.cache),
            "CONVEYOR_MODEL_PRICE_PROMPT": repr(self.model.price_prompt),
            "CONVEYOR_MODEL_PRICE_COMPLETION": repr(self.model.price_completion),
            "CONVEYOR_BATCH_MAX_SIZE": str(self.model.batch_max_size),
            "CONVEYOR_BATCH_MAX_WAIT": repr(self.model.batch_max_wait),
            "CONVEYOR_BLOCKLIST": "\n".join(self.blocklist),
            "CONVEYOR_CALLBACK_HOSTS": "\n".join(self.callback_hosts),
            "CONVEYOR_LOG_LEVEL": self.log_level,
            "CONVEYOR_LOG_FORMAT": self.log_format,
            "CONVEYOR_MODELS": json.dumps([m.to_fields() for m in self.models]),
            "CONVEYOR_SERVE": "\n".join(self.serve),
            "CONVEYOR_ALIASES": json.dumps({alias: dict(targets) for alias, targets in self.aliases.items()}),
        }
        if self.model.batch_target_latency is not None:
            env["CONVEYOR_BATCH_TARGET_LATENCY"] = repr(self.model.batch_target_latency)
        if self.model.price_cached is not None:
            env["CONVEYOR_MODEL_PRICE_CACHED"] = repr(self.model.price_cached)
        if self.log_url:
            env["CONVEYOR_LOG_URL"] = self.log_url
        if self.store_url:
            env["CONVEYOR_STORE_URL"] = self.store_url
        if self.blob_url:
            env["CONVEYOR_BLOB_URL"] = self.blob_url
        optional = {
            "CONVEYOR_API_KEYS_FILE": self.api_keys_file,
            "CONVEYOR_RATE_LIMIT": self.rate_limit,
            "CONVEYOR_RATE_BURST": self.rate_burst,
            "CONVEYOR_MAX_BACKLOG": self.max_backlog,
            "CONVEYOR_TOKEN_LIMIT": self.token_limit,
            "CONVEYOR_MAX_PARALLEL": self.max_parallel,
            "CONVEYOR_BUDGET": self.budget,
            "CONVEYOR_MAX_BODY_BYTES": self.max_body_bytes,
        }
        env.update({name: str(value) for name, value in optional.items() if value is not None})
        return env


# Every setting's name, in the environment (CONVEYOR_<NAME>) and in a config file (<name>).
NAMES = frozenset(
    {
        "HOST",
        "PORT",
        "DATA_DIR",
        "LOG_URL",
        "STORE_URL",
        "BLOB_URL",
        "MAX_EVENT_BYTES",
        "MAX_BODY_BYTES",
        "ACCESS_LOG",
        "ALIAS_ROUTING",
        "PREFIX",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "ACK_WAIT",
        "METRICS_PORT",
        "BLOCKLIST",
        "MODEL",
        "MODEL_NAME",
        "MODEL_VERSION",
        "MODEL_LICENSE",
        "MODEL_TTFT",
        "MODEL_TOKEN_DELAY",
        "UPSTREAM_URL",
        "UPSTREAM_MODEL",
        "MODEL_SLOTS",
        "MODEL_CONTEXT",
        "PREFIX_CACHE",
        "MODEL_WEIGHTS",
        "MODEL_BACKGROUND",
        "MODEL_FALLBACK",
        "MODEL_CACHE",
        "MODEL_PRICE_PROMPT",
        "MODEL_PRICE_COMPLETION",
        "MODEL_PRICE_CACHED",
        "BATCH_MAX_SIZE",
        "BATCH_MAX_WAIT",
        "BATCH_TARGET_LATENCY",
        "API_KEYS_FILE",
        "RATE_LIMIT",
        "RATE_BURST",
        "MAX_BACKLOG",
        "TOKEN_LIMIT",
        "MAX_PARALLEL",
        "BUDGET",
        "CALLBACK_HOSTS",
        "MODELS",
        "SERVE",
        "ALIASES",
    }
)


def _read_config(path: Path) -> dict[str, str]:
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the config file {path}: {exc}") from exc
    unknown = sorted(k for k in table if k.upper() not in NAMES)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(n.lower() for n in NAMES)}")
    return {f"CONVEYOR_{k.upper()}": _setting(v) for k, v in table.items()}


def _setting(value: Any) -> str:
    """A config file's value as the environment has it: a table (``[aliases]``) or a list of tables
    (``[[models]]``) as JSON, a list of strings one per line."""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        return json.dumps(value)
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _aliases(value: str) -> dict[str, tuple[tuple[str, float], ...]]:
    """``{"alias": {"model id": weight, ...}, ...}`` (JSON, or a config file's ``[aliases]`` table)."""
    try:
        table = json.loads(value)
        return {
            str(alias): tuple((str(m), float(w)) for m, w in targets.items())
            for alias, targets in table.items()
        }
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"aliases must map each alias to {{model id: weight}}: {exc}") from exc


def _models(value: str) -> list[Mapping[str, Any]]:
    try:
        models = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"CONVEYOR_MODELS is not JSON: {exc}") from exc
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ValueError("CONVEYOR_MODELS must be a JSON list of objects, one per model")
    return models


def _flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _phrases(value: str) -> tuple[str, ...]:
    """Blocked phrases: one per line, or comma-separated on a single line."""
    parts = value.splitlines() if "\n" in value else value.split(",")
    return tuple(p.strip() for p in parts if p.strip())
