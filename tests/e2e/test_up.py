"""``conveyor up`` as a user runs it: a subprocess with the bundled NATS server, over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.backends import open_store
from conveyor.callbacks import SIGNATURE_HEADER, verify
from conveyor.events import Topic, new_event
from conveyor.files import PIECE
from conveyor.log.kafka import KafkaEventLog
from conveyor.log.nats import NatsEventLog
from conveyor.models.simulated import SimulatedModel
from conveyor.payloads import DeadLetter, EventType, RequestAccepted, RequestPrepared, decode
from conveyor.store.base import Namespace
from conveyor.testing import UpProcess
from tests.conftest import unique_prefix
from tests.e2e.conftest import ConveyorFactory
from tests.helpers import Receiver, read_sse, receiving, sdk, streamed_text, submit, wait_final

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backends", ["bundled-nats", "kafka+redis"])
async def test_fifty_concurrent_requests_complete_and_stream_their_output(
    conveyor: ConveyorFactory, backends: str, request: pytest.FixtureRequest
) -> None:
    if backends == "kafka+redis":
        store_url = request.getfixturevalue("redis_url")
        up = conveyor("--log-url", request.getfixturevalue("kafka_url"), "--store-url", store_url).start()
    else:
        up = conveyor().start()
        store_url = up.log_url
    model = SimulatedModel()
    async with httpx.AsyncClient(base_url=up.url, timeout=60) as client:
        prompts = [f"request number {i} about queues" for i in range(50)]
        rids = await asyncio.gather(*(submit(client, p, max_tokens=32) for p in prompts))
        streams = await asyncio.gather(*(read_sse(client, rid) for rid in rids))
        views = await asyncio.gather(*(wait_final(client, rid) for rid in rids))
        for prompt, view, events in zip(prompts, views, streams, strict=True):
            assert view["status"] == "completed"
            assert view["output"] == "".join(model.answer(prompt, 32)[0]).strip()
            assert streamed_text(events).strip() == view["output"]
            assert events[-1][1] == "completed"
        # Resume in the middle of one stream: the rest, without gaps or repeats.
        events = streams[0]
        assert await read_sse(client, rids[0], last_event_id=str(events[2][0])) == events[3:]
    store = await open_store(store_url)
    try:
        assert set(rids) <= set(await store.keys(Namespace.USAGE))
    finally:
        await store.close()
    # The stage worker process serves its own metrics; the projector runs beside the gateway.
    (metrics_url,) = up.metrics_urls
    async with httpx.AsyncClient(timeout=10) as client:
        worker_metrics = (await client.get(metrics_url)).text
        gateway_metrics = (await client.get(f"{up.url}/metrics")).text
    assert handled(worker_metrics, "generate") >= 50
    assert 'stage="projector"' not in worker_metrics
    assert handled(gateway_metrics, "projector") >= 100  # accepted, prepared, completed each
    assert "projector in this process" in "".join(up.output)
    assert up.stop() == 0
    assert up.nats_pid is None  # SIGTERM stopped any bundled server and cleared its state


def handled(metrics: str, stage: str) -> float:
    """Events ``stage`` handled, from a /metrics page (0 if it shows none)."""
    prefix = f'conveyor_events_total{{outcome="ok",stage="{stage}"}} '
    return sum(float(line[len(prefix) :]) for line in metrics.splitlines() if line.startswith(prefix))


@pytest.mark.parametrize("backends", ["bundled-nats", "kafka+redis"])
async def test_garbage_on_a_topic_is_dead_lettered_and_the_pipeline_keeps_serving(
    conveyor: ConveyorFactory, backends: str, request: pytest.FixtureRequest
) -> None:
    log: NatsEventLog | KafkaEventLog
    if backends == "kafka+redis":
        kafka_url, env = request.getfixturevalue("kafka_url"), {"CONVEYOR_PREFIX": unique_prefix()}
        store = ("--store-url", request.getfixturevalue("redis_url"))
        up = conveyor("--log-url", kafka_url, *store, "--log-format", "json", env=env).start()
        log = await KafkaEventLog.open(kafka_url, prefix=env["CONVEYOR_PREFIX"])
        where = ("--log-url", kafka_url)  # the operator's commands name the log
    else:
        env = {}
        up = conveyor("--log-format", "json").start()
        log = await NatsEventLog.open(up.log_url)
        where = ("--data-dir", str(up.data_dir))  # ...or find conveyor up through its data dir
    try:
        await log.publish_raw(Topic.REQUESTS, "poison", {"ce-id": "x"}, b"\xff\xfe not json")
        await log.publish_raw(Topic.PREPARED, "poison", None, b"{}")
        # Every consumer of those topics (the stage and the projector) dead-letters its copy.
        expected = {
            ("prepare", "requests"),
            ("generate", "prepared"),
            ("projector", "requests"),
            ("projector", "prepared"),
        }
        letters: dict[tuple[str, str], DeadLetter] = {}
        async with asyncio.timeout(30), contextlib.aclosing(log.tail(Topic.DLQ, None)) as dlq:
            async for tailed in dlq:
                letter = decode(DeadLetter, tailed.envelope.data)
                letters[(letter.stage, letter.topic)] = letter
                if set(letters) == expected:
                    break
        assert all("not a Conveyor event" in d.error for d in letters.values())
        # Each process said so on its stderr, a JSON line each, with the fields a log search wants
        # (the worker process's lines come through conveyor up's).
        for stage, topic in expected:
            pattern = f'"stage":"{stage}","topic":"{topic}"'
            said = json.loads(await asyncio.to_thread(up.wait_for, pattern))
            assert (said["level"], said["logger"]) == ("warning", "conveyor.runtime")
            assert "dead-lettered" in said["message"]
            assert said["request_id"].startswith(f"undecodable-{topic}-")
        # An operator finds them with `conveyor dlq`, which locates the running server by data dir.
        listed = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "conveyor", "dlq", "--json", *where),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
        )
        async with asyncio.timeout(30):
            stdout, _ = await listed.communicate()
        assert listed.returncode == 0
        rows = [json.loads(line) for line in stdout.splitlines()]
        assert {(r["stage"], r["topic"]) for r in rows} == expected
        assert {r["original_body"] for r in rows} == {"\\xff\\xfe not json", "{}"}
        # Garbage cannot be sent back to a stage: said of each letter, and the command fails.
        redrive = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "conveyor", "dlq", "--redrive-all", *where),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
        )
        async with asyncio.timeout(30):
            sent, refused = await redrive.communicate()
        assert redrive.returncode == 1
        assert (sent, refused.decode().count("not sent back")) == (b"", len(expected))
        lag = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "conveyor", "lag", *where),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
        )
        async with asyncio.timeout(30):
            table, _ = await lag.communicate()
        groups = {tuple(line.split()[:2]) for line in table.decode().splitlines()[1:]}
        assert {("requests", "prepare"), ("prepared", "generate"), ("dlq", "projector")} <= groups
        async with httpx.AsyncClient(base_url=up.url, timeout=30) as client:
            bad = [
                (b'{"prompt": ', 400),
                (b'{"prompt": ["a list"]}', 422),
                # Over the 8 MiB a deployment with a blob store takes (256 KiB without one).
                (b'{"prompt": "' + b"x" * 9_000_000 + b'"}', 413),
            ]
            for body, status in bad:
                response = await client.post(
                    "/v1/requests", content=body, headers={"content-type": "application/json"}
                )
                assert response.status_code == status
                assert response.json()["error"]["message"]
            assert (await client.get("/v1/requests/unknown-id")).status_code == 404
            rid = await submit(client, "email me at jane@example.com or call +44 20 7946 0958")
            assert (await wait_final(client, rid))["status"] == "completed"
        # The prompt was redacted before it reached the rest of the pipeline.
        prepared = [
            decode(RequestPrepared, t.envelope.data)
            async for t in log.tail(Topic.PREPARED, rid, follow=False)
            if t.envelope.type == EventType.PREPARED
        ]
        assert [p.prompt for p in prepared] == ["email me at [EMAIL] or call [PHONE]"]
    finally:
        await log.close()


async def test_a_dead_letter_sent_back_from_the_command_line_goes_to_its_stage_alone(
    conveyor: ConveyorFactory,
) -> None:
    up = conveyor().start()
    log = await NatsEventLog.open(up.log_url)
    try:
        # A well-formed event whose payload prepare cannot read (a number for the prompt); the
        # projector, which reads [requests] too, only needs the envelope and folds it.
        valid = new_event(type=EventType.ACCEPTED, source="test", payload=RequestAccepted(prompt="x"))
        await log.publish(Topic.REQUESTS, [dataclasses.replace(valid, data=b'{"prompt": 42}')])
        letters = []
        async with asyncio.timeout(30), contextlib.aclosing(log.tail(Topic.DLQ, None)) as dlq:
            async for tailed in dlq:
                letters.append(decode(DeadLetter, tailed.envelope.data))
                if len(letters) == 1:
                    # Fixed (say), it is sent back with `conveyor dlq --redrive REQUEST_ID`.
                    redrive = await asyncio.create_subprocess_exec(
                        *(sys.executable, "-m", "conveyor", "dlq", "--redrive", valid.request_id),
                        *("--data-dir", str(up.data_dir)),
                        stdout=asyncio.subprocess.PIPE,
                    )
                    sent, _ = await redrive.communicate()
                    assert redrive.returncode == 0
                    assert sent.decode() == f"sent back to prepare on [requests]: {valid.request_id}\n"
                if len(letters) == 2:
                    break
        # Not fixed after all: prepare, and prepare alone, gave up on it again, as the copy sent
        # back (its own id, marked for prepare) that its letter holds.
        assert [(d.stage, d.topic) for d in letters] == [("prepare", "requests")] * 2
        first, again = (d.original_headers for d in letters)
        assert "ce-redrive" not in first
        assert again["ce-redrive"] == "prepare"
        assert again["ce-causationid"] == valid.id
        assert again["ce-subject"] == valid.request_id
        assert again["ce-id"] != valid.id
    finally:
        await log.close()
    assert up.stop() == 0


async def test_conveyor_replay_answers_the_history_again_and_usage_shows_it_billed_nobody(
    conveyor: ConveyorFactory,
) -> None:
    up = conveyor().start()
    async with httpx.AsyncClient(base_url=up.url, timeout=30) as client:
        rids = [await submit(client, f"replay me {i}", max_tokens=16) for i in range(3)]
        for rid in rids:
            assert (await wait_final(client, rid))["status"] == "completed"

    async def replay(*options: str) -> tuple[list[dict[str, Any]], str]:
        command = ("-m", "conveyor", "replay", "--data-dir", str(up.data_dir), "--model", "simulated")
        process = await asyncio.create_subprocess_exec(
            sys.executable, *command, *options, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(60):
            out, err = await process.communicate()
        assert process.returncode == 0, err
        return [json.loads(line) for line in out.splitlines()], err.decode()

    lines, summary = await replay("--limit", "2")
    assert sorted(line["id"] for line in lines) == sorted(rids[:2])  # the oldest two
    for line in lines:
        assert line["after"]["status"] == "completed"
        assert line["before"] == {
            "status": "completed",
            "output": line["after"]["output"],
            "model": "simulated",
        }
    assert "replayed 2 requests with simulated: 2 completed; 0 answers differ from the log's" in summary
    assert await replay("--since", "2999-01-01") == (
        [],
        "replayed 0 requests with simulated: none; 0 answers differ from the log's\n",
    )
    # The history was only read: the running pipeline's [requests] holds the three requests alone.
    log = await NatsEventLog.open(up.log_url)
    try:
        on_log = [t.envelope.request_id async for t in log.tail(Topic.REQUESTS, None, follow=False)]
    finally:
        await log.close()
    assert on_log == rids
    # What the tenant used: the three requests as their views count them, each once; the replay
    # billed nobody.
    async with httpx.AsyncClient(base_url=up.url, timeout=30) as client:
        views = [(await client.get(f"/v1/requests/{rid}")).json() for rid in rids]

    async def usage(*options: str) -> list[str]:
        command = (sys.executable, "-m", "conveyor", "usage", "--data-dir", str(up.data_dir), *options)
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        async with asyncio.timeout(60):
            out, _ = await process.communicate()
        assert process.returncode == 0
        return out.decode().splitlines()

    (used,) = [json.loads(line) for line in await usage("--json")]
    assert (used["tenant"], used["model"], used["requests"]) == ("default", "simulated", 3)
    for count in ("prompt_tokens", "completion_tokens"):
        assert used[count] == sum(view["usage"][count] for view in views) > 0
    header, row = await usage("--tenant", "default")
    assert header.split() == [
        "tenant",
        "model",
        "requests",
        "from_cache",
        "prompt",
        "cached",
        "completion",
        "total",
        "cost_usd",
    ]
    numbers = ("prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens")
    # The simulated model has no price: it cost nothing.
    assert row.split() == ["default", "simulated", "3", "0", *(str(used[c]) for c in numbers), "0.0000"]
    assert await usage("--tenant", "globex") == [header]
    assert up.stop() == 0


async def test_conveyor_submit_prints_the_output_as_it_streams_then_the_final_status(
    conveyor: ConveyorFactory,
) -> None:
    up = conveyor("--model-token-delay", "0.002", "--add-model", "fast=simulated").start()

    async def submit_command(*arguments: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "conveyor", "submit", "--url", up.url, *arguments),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    prompt = "Write a haiku about queues"
    tokens, _ = SimulatedModel().answer(prompt, 24)
    code, out, err = await submit_command("--max-tokens", "24", prompt)
    assert code == 0, err
    assert out == "".join(tokens) + "\n"
    rid = re.search(r"^request (\S+)$", err, re.MULTILINE)
    assert rid is not None, err
    assert "status: completed" in err
    usage = re.search(r"^usage: (.+)$", err, re.MULTILINE)
    assert usage is not None, err
    assert json.loads(usage.group(1))["completion_tokens"] == len(tokens)
    async with httpx.AsyncClient(base_url=up.url) as client:
        assert (await wait_final(client, rid.group(1)))["output"] == out.strip()
    # Asked for JSON (with the other sampling options), it prints the JSON the model answered.
    schema = {"type": "object", "properties": {"haiku": {"type": "string"}}}
    options = ("--json-schema", json.dumps(schema), "--temperature", "0.5", "--seed", "7", "--priority", "-3")
    code, out, err = await submit_command(*options, prompt)
    assert code == 0, err
    assert list(json.loads(out)) == ["haiku"]
    # The deployment's other model, by its id.
    code, out, err = await submit_command("--model", "fast", "--max-tokens", "24", prompt)
    assert (code, out) == (0, "".join(tokens) + "\n"), err
    rid = re.search(r"^request (\S+)$", err, re.MULTILINE)
    assert rid is not None, err
    async with httpx.AsyncClient(base_url=up.url) as client:
        assert (await wait_final(client, rid.group(1)))["model"] == "fast"
    code, out, err = await submit_command("--model", "slow", prompt)
    assert (code, out) == (1, "")
    assert "model_not_found" in err
    # A refusal is said with the gateway's reason, and the command fails.
    code, out, err = await submit_command("--max-tokens", "100000", prompt)
    assert (code, out) == (1, "")
    assert "error: 422" in err
    assert "max_tokens_too_large" in err
    assert up.stop() == 0


async def test_conveyor_bench_loads_the_gateway_and_reports_what_clients_saw(
    conveyor: ConveyorFactory,
) -> None:
    up = conveyor("--model-token-delay", "0.002").start()

    async def bench(*options: str) -> tuple[int, str]:
        command = ("-m", "conveyor", "bench", "--url", up.url, "--concurrency", "4", *options)
        process = await asyncio.create_subprocess_exec(
            sys.executable, *command, stdout=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(60):
            out, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode()

    async def completes(requests: int, *options: str) -> None:
        code, report = await bench("--requests", str(requests), "--max-tokens", "16", *options)
        assert code == 0, report
        assert f"requests: {requests} sent, {requests} completed, 0 not in" in report
        tokens = re.search(r"([\d.]+) completion tokens/s", report)
        assert tokens is not None, report
        assert float(tokens.group(1)) > 0, report
        assert re.search(r"time to first token  p50 \d+ ms  p90 \d+ ms  p99 \d+ ms", report), report

    await completes(20)
    # Bounded in time too: what is in flight then is cut off, and said so.
    code, report = await bench("--requests", "100000", "--seconds", "1", "--max-tokens", "16")
    assert code == 0, report
    assert re.search(r"requests: \d+ sent, \d+ completed, 0 not, [1-4] cut off by the time limit in", report)
    # Refused requests are counted with the gateway's reason, and the command fails.
    code, report = await bench("--requests", "3", "--max-tokens", "100000")
    assert code == 1
    assert "requests: 3 sent, 0 completed, 3 not in" in report
    assert "error: 3 x HTTP 422: max_tokens_too_large" in report
    # The same load through the OpenAI API, as an OpenAI SDK user sends it.
    await completes(10, "--api", "openai")
    code, report = await bench("--requests", "2", "--max-tokens", "100000", "--api", "openai")
    assert code == 1
    assert re.search(r"error: 2 x HTTP 4\d\d: \S+: .*max_tokens", report), report
    assert up.stop() == 0


async def test_callbacks_come_signed_from_the_worker_processes_and_only_to_the_allowed_hosts(
    conveyor: ConveyorFactory,
) -> None:
    receiver = Receiver()
    async with receiving(receiver) as url:
        # The hosts and the secret reach the gateway and the worker process it starts.
        up = conveyor("--callback-hosts", "127.0.0.1", env={"CONVEYOR_CALLBACK_SECRET": "s3cret"}).start()
        async with httpx.AsyncClient(base_url=up.url) as client:
            rid = await submit(client, "Write a haiku about queues", callback_url=url)
            async with asyncio.timeout(30):
                await receiver.called.wait()
            view = await wait_final(client, rid)
            other = url.replace("127.0.0.1", "localhost")  # loopback too, but not in the list
            refused = await client.post("/v1/requests", json={"prompt": "hi", "callback_url": other})
        assert up.stop() == 0
    ((headers, body),) = receiver.calls
    assert verify("s3cret", body, headers[SIGNATURE_HEADER])
    assert json.loads(body) == {k: view[k] for k in json.loads(body)}
    assert json.loads(body)["status"] == "completed"
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "callback_not_allowed"


async def test_a_worker_process_that_cannot_start_stops_conveyor_up_with_its_reason(tmp_path: Path) -> None:
    # The stages run in a child process: its failure must not hide behind a banner and a
    # restart loop (the openai backend without an upstream cannot start).
    up = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "conveyor", "up", "--port", "0", "--data-dir", str(tmp_path / "data")),
        *("--model", "openai"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await up.communicate()
    text = output.decode()
    assert up.returncode == 1
    assert "--model openai needs --upstream-url" in text
    assert "worker process 0 (prepare generate finalize deliver) exited with 1" in text
    assert "Conveyor is up" not in text


def started(
    conveyor: ConveyorFactory, backends: str, request: pytest.FixtureRequest, *options: str
) -> UpProcess:
    """``conveyor up`` with ``options`` on the bundled NATS, or on Kafka + Redis (a prefix of its own)."""
    if backends == "bundled-nats":
        return conveyor(*options).start()
    urls = (
        "--log-url",
        request.getfixturevalue("kafka_url"),
        "--store-url",
        request.getfixturevalue("redis_url"),
    )
    return conveyor(*options, *urls, env={"CONVEYOR_PREFIX": unique_prefix()}).start()


@pytest.mark.parametrize("backends", ["bundled-nats", "kafka+redis"])
async def test_a_batch_file_larger_than_one_stored_value_is_answered_through_conveyor_up(
    conveyor: ConveyorFactory, backends: str, request: pytest.FixtureRequest
) -> None:
    up = started(conveyor, backends, request)
    # Long prompts: the file is larger than a NATS message may be (1 MB), stored in pieces.
    prompts = {f"line-{i}": f"request {i}: " + "tell me about queues " * 350 for i in range(150)}
    lines = [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "simulated", "prompt": prompt, "max_tokens": 4},
        }
        for cid, prompt in prompts.items()
    ]
    content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    assert len(content) > 1024 * 1024 > PIECE
    async with sdk(up.url) as client:
        uploaded = await client.files.create(file=("in.jsonl", content), purpose="batch")
        assert (await client.files.content(uploaded.id)).content == content
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
        )
        batch = await client.batches.retrieve(created.id, extra_query={"wait": 60})
        assert batch.status == "completed", batch
        assert batch.output_file_id is not None
        output = (await client.files.content(batch.output_file_id)).content.splitlines()
    model = SimulatedModel()
    answered = {line["custom_id"]: line["response"]["body"] for line in map(json.loads, output)}
    assert set(answered) == set(prompts)
    for cid, body in answered.items():
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == "".join(model.answer(prompts[cid], 4)[0])
    assert up.stop() == 0


@pytest.mark.parametrize("backends", ["bundled-nats", "kafka+redis"])
async def test_the_answer_cache_and_token_limits_work_across_conveyor_ups_processes(
    conveyor: ConveyorFactory, backends: str, request: pytest.FixtureRequest
) -> None:
    # The worker process keeps answers and writes the ledger; the gateway reads the ledger's writes.
    options = ("--model-cache", "60", "--token-limit", "60")
    up = started(conveyor, backends, request, *options)
    async with httpx.AsyncClient(base_url=up.url, timeout=60) as client:

        async def asked() -> httpx.Response:
            return await client.post(
                "/v1/requests", params={"wait": 30}, json={"prompt": "the same", "max_tokens": 16}
            )

        first, again = (await asked()).json(), (await asked()).json()
        assert (first["cached"], again["cached"]) == (False, True)
        assert again["output"] == first["output"]
        for _ in range(20):  # each counts its tokens, cached or not: the tenant reaches its limit
            answer = await asked()
            if answer.status_code == 429:
                break
        assert answer.status_code == 429
        assert answer.json()["error"]["code"] == "token_limit"
    assert up.stop() == 0
