"""The local model (SmolLM2 on llama.cpp) with continuous batching: real generation, run in CI."""

from __future__ import annotations

import asyncio
import collections
import json
import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from conveyor.config import LOCAL_WEIGHTS, ModelSettings
from conveyor.errors import PermanentError
from conveyor.models.base import GenerationRequest, Token
from conveyor.models.local import WEIGHTS, LocalModel, shipped_gguf
from conveyor.models.tools import PromptedTools
from conveyor.observability.metrics import PROMPT_TOKENS
from conveyor.payloads import ChatMessage, TokenLogprob, Tool
from tests.conftest import NodeFactory
from tests.helpers import read_sse, sdk, submit, wait_final

pytestmark = pytest.mark.model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about queues.",
    "Name three colors.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Give one tip for sleeping well.",
    "What is the opposite of hot?",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModel]:
    # One model for the module (loading is the slow part); its engine serves any event loop.
    backend = LocalModel(cache_dir=tmp_path_factory.mktemp("models"), slots=8, context_per_slot=512)
    yield backend
    asyncio.run(backend.close())


async def run(model: LocalModel, requests: list[GenerationRequest]) -> dict[str, tuple[str, str | None]]:
    """Text and finish reason per request id."""
    texts: dict[str, list[str]] = {r.id: [] for r in requests}
    finish: dict[str, str | None] = {}
    async for token in model.generate(requests):
        texts[token.request_id].append(token.text)
        if token.finish_reason:
            finish[token.request_id] = token.finish_reason
    return {rid: ("".join(parts), finish.get(rid)) for rid, parts in texts.items()}


def turn(role: str, content: str) -> ChatMessage:
    return ChatMessage(role=role, content=content)  # type: ignore[arg-type]


def request(i: int, prompt: str, *, max_tokens: int = 48, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(id=f"r{i}", prompt=prompt, max_tokens=max_tokens, stop=stop)


async def greedy_alone_equals_inside_a_batch_of_8(model: LocalModel) -> None:
    alone = [(await run(model, [request(i, p)]))[f"r{i}"] for i, p in enumerate(PROMPTS)]
    together = await run(model, [request(i, p) for i, p in enumerate(PROMPTS)])
    assert [together[f"r{i}"] for i in range(len(PROMPTS))] == alone
    assert "Paris" in alone[0][0]
    assert all(text.strip() for text, _ in alone)


async def test_greedy_output_alone_equals_output_inside_a_batch_of_8(model: LocalModel) -> None:
    await greedy_alone_equals_inside_a_batch_of_8(model)


async def test_greedy_output_alone_equals_output_inside_a_batch_of_8_with_f16_weights(tmp_path: Path) -> None:
    f16 = LocalModel(cache_dir=tmp_path, slots=8, context_per_slot=512, weights="f16")
    try:
        await greedy_alone_equals_inside_a_batch_of_8(f16)
    finally:
        await f16.close()


async def test_a_prompt_already_in_a_slot_cache_is_not_computed_again_and_answers_the_same(
    model: LocalModel,
) -> None:
    def read() -> tuple[float, float]:
        return PROMPT_TOKENS.value(source="cached"), PROMPT_TOKENS.value(source="computed")

    def chat(i: int, *turns: ChatMessage) -> GenerationRequest:
        system = turn("system", "You are a concise assistant. Answer every question in one short sentence.")
        return GenerationRequest(id=f"r{i}", prompt="", max_tokens=24, messages=(system, *turns))

    question = turn("user", "Name a fruit that is yellow and curved.")
    first = (await run(model, [chat(0, question)]))["r0"]
    assert first[0].strip()
    # Another question under the same system turn: the system turn is found in a slot's cache.
    cached, _ = read()
    await run(model, [chat(1, turn("user", "Name a fruit that is red."))])
    assert PROMPT_TOKENS.value(source="cached") - cached >= model.count_tokens(chat(0).messages[0].content)
    # The conversation's next turn carries the first answer: that is found too.
    cached, _ = read()
    await run(model, [chat(2, question, turn("assistant", first[0]), turn("user", "And a red one?"))])
    assert PROMPT_TOKENS.value(source="cached") - cached > model.count_tokens(first[0])
    # The same prompt again: only its last token is computed (its logits give the first output
    # token), and the answer is the one computed from scratch.
    _, computed = read()
    tokens = [token async for token in model.generate([chat(3, question)])]
    assert PROMPT_TOKENS.value(source="computed") - computed == 1
    assert ("".join(t.text for t in tokens), tokens[-1].finish_reason) == first
    usage = tokens[-1].usage  # the request's usage says what it found cached
    assert usage is not None
    assert usage.cached_tokens == usage.prompt_tokens - 1
    assert 0 < usage.completion_tokens <= 24


async def test_requests_arriving_together_copy_a_running_slots_cache_and_answer_the_same(
    model: LocalModel,
) -> None:
    system = turn(
        "system",
        "You are a museum guide. You answer visitors' questions about paintings in one friendly "
        "sentence, and you never mention prices or opening hours.",
    )
    questions = ["Who painted the Mona Lisa?", "What is a fresco?", "Why is the sky in paintings blue?"]

    def ask(i: int) -> GenerationRequest:
        turns = (system, turn("user", questions[i]))
        return GenerationRequest(id=f"r{i}", prompt="", max_tokens=24, messages=turns)

    await run(model, [ask(0)])  # the system turn is now in one slot
    cached = PROMPT_TOKENS.value(source="cached")
    together = await run(model, [ask(i) for i in range(3)])
    # The first takes that slot; the other two copy its cache into their own slots rather than
    # compute the system turn again.
    assert PROMPT_TOKENS.value(source="cached") - cached >= 3 * model.count_tokens(system.content)
    # Copied cache or not, each answer is the one the request gets on its own.
    for i in range(3):
        assert (await run(model, [ask(i)]))[f"r{i}"] == together[f"r{i}"]


async def test_a_burst_with_a_system_turn_never_seen_reads_it_once(model: LocalModel) -> None:
    system = turn(
        "system",
        "You are a ship's navigator. Answer sailors' questions about stars and tides in one calm "
        "sentence, and never guess at the weather.",
    )
    questions = ["Which star points north?", "When is high tide?", "What is a knot?"]
    burst = [
        GenerationRequest(id=f"r{i}", prompt="", max_tokens=16, messages=(system, turn("user", q)))
        for i, q in enumerate(questions)
    ]
    cached = PROMPT_TOKENS.value(source="cached")
    answers = await run(model, burst)
    # The first reads the system turn; the others wait for it and copy its cache.
    assert PROMPT_TOKENS.value(source="cached") - cached >= 2 * model.count_tokens(system.content)
    assert all(text.strip() and finish for text, finish in answers.values())


async def test_a_request_cancelled_while_it_waits_for_a_shared_prompt_start_ends_at_once(
    model: LocalModel,
) -> None:
    rules = " ".join(f"Rule {i}: answer in plain words and keep to the point." for i in range(30))
    system = turn("system", f"You are a careful librarian. {rules}")

    def ask(i: int, question: str) -> GenerationRequest:
        return GenerationRequest(
            id=f"r{i}", prompt="", max_tokens=8, messages=(system, turn("user", question))
        )

    reader, waiter = ask(0, "Where are the maps?"), ask(1, "Where are the novels?")
    waiter.cancelled.set()  # it arrives while the first still reads the long system turn
    answers = await asyncio.wait_for(run(model, [reader, waiter]), 60)
    assert answers["r1"] == ("", "cancelled")
    assert answers["r0"][1] in ("stop", "length")
    assert answers["r0"][0].strip()


async def test_max_tokens_is_honoured(model: LocalModel) -> None:
    text, finish = (await run(model, [request(0, "Write a long story about a river.", max_tokens=5)]))["r0"]
    assert finish == "length"
    assert 1 <= model.count_tokens(text) <= 7  # re-tokenizing text may merge or split a token


async def test_a_stop_sequence_ends_the_text_before_it(model: LocalModel) -> None:
    full, _ = (await run(model, [request(0, PROMPTS[0])]))["r0"]
    assert "Paris" in full
    text, finish = (await run(model, [request(0, PROMPTS[0], stop=("Paris",))]))["r0"]
    assert finish == "stop"
    assert text == full[: full.index("Paris")]


async def test_a_sampled_answer_follows_its_seed(model: LocalModel) -> None:
    def sampled(rid: str, seed: int | None) -> GenerationRequest:
        return GenerationRequest(id=rid, prompt=PROMPTS[1], max_tokens=24, temperature=1.0, seed=seed)

    texts = await run(
        model, [sampled("a", 7), sampled("b", 7), sampled("c", 8), sampled("d", None), sampled("e", None)]
    )
    assert texts["a"] == texts["b"]  # one seed: one answer, whatever the request's id
    assert texts["c"][0] != texts["a"][0]  # another seed: another draw (24 tokens at temperature 1)
    assert texts["d"][0] != texts["e"][0]  # no seed: drawn from the request's id


async def test_penalties_make_a_repetitive_answer_repeat_less(model: LocalModel) -> None:
    def most_repeated(text: str) -> int:
        return max(collections.Counter(text.split()).values())

    prompt = "Write the word cat twenty times, separated by spaces."
    asked = [
        GenerationRequest(id="plain", prompt=prompt, max_tokens=40),
        GenerationRequest(id="frequency", prompt=prompt, max_tokens=40, frequency_penalty=1.5),
        GenerationRequest(id="presence", prompt=prompt, max_tokens=40, presence_penalty=1.5),
    ]
    texts = {rid: text for rid, (text, _) in (await run(model, asked)).items()}
    assert most_repeated(texts["frequency"]) < most_repeated(texts["plain"])
    assert most_repeated(texts["presence"]) < most_repeated(texts["plain"])


async def test_a_logit_bias_steers_the_answer_and_an_unknown_token_fails_that_request_alone(
    model: LocalModel,
) -> None:
    (the,) = model.tokens(" the")
    steered = GenerationRequest(id="steered", prompt=PROMPTS[0], max_tokens=6, logit_bias=((the, 100.0),))
    unknown = GenerationRequest(id="unknown", prompt=PROMPTS[0], max_tokens=6, logit_bias=((10**9, 1.0),))
    failures = {}
    texts: dict[str, str] = {"steered": "", "unknown": ""}
    async for token in model.generate([steered, unknown]):
        texts[token.request_id] += token.text
        if token.error is not None:
            failures[token.request_id] = token.error
    assert texts["steered"].split() == ["the"] * 6
    assert list(failures) == ["unknown"]
    assert isinstance(failures["unknown"], PermanentError)
    assert "logit_bias" in str(failures["unknown"])


async def test_an_answer_held_to_a_json_schema_is_that_json_and_a_schema_it_cannot_follow_fails(
    model: LocalModel,
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
    }
    prompt = "What is the capital of France? Answer with the city and its country."
    asked = [
        GenerationRequest(id="free", prompt=prompt, max_tokens=48),
        GenerationRequest(id="held", prompt=prompt, max_tokens=48, json_schema=schema),
        GenerationRequest(id="any", prompt=PROMPTS[2], max_tokens=48, json_schema={"type": "object"}),
        GenerationRequest(
            id="sampled", prompt=prompt, max_tokens=48, json_schema=schema, temperature=1.0, seed=1
        ),
        GenerationRequest(id="bad", prompt=prompt, max_tokens=8, json_schema={"type": "no such type"}),
    ]
    texts: dict[str, str] = {r.id: "" for r in asked}
    finish, failures = {}, {}
    async for token in model.generate(asked):
        texts[token.request_id] += token.text
        if token.finish_reason:
            finish[token.request_id] = token.finish_reason
        if token.error is not None:
            failures[token.request_id] = token.error
    with pytest.raises(json.JSONDecodeError):
        json.loads(texts["free"])  # left alone, the model answers in prose
    answer = json.loads(texts["held"])
    assert set(answer) == {"city", "country"}
    assert "Paris" in answer["city"]
    assert finish["held"] == "stop"  # the grammar let it end once the object was whole
    assert isinstance(json.loads(texts["any"]), dict)
    assert set(json.loads(texts["sampled"])) == {"city", "country"}  # drawn, and held all the same
    assert list(failures) == ["bad"]
    assert isinstance(failures["bad"], PermanentError)
    assert "response_format" in str(failures["bad"])


async def test_a_continuation_reads_the_prompt_as_it_is_without_the_chat_template(model: LocalModel) -> None:
    prompt = "The capital of France is"
    asked = [
        GenerationRequest(id="continued", prompt=prompt, max_tokens=8, continuation=True),
        GenerationRequest(id="chat", prompt=prompt, max_tokens=8),
        GenerationRequest(id="special", prompt="<|im_start|>", max_tokens=2, continuation=True),
    ]
    usage = {}
    texts: dict[str, str] = {r.id: "" for r in asked}
    async for token in model.generate(asked):
        texts[token.request_id] += token.text
        if token.usage is not None:
            usage[token.request_id] = token.usage.prompt_tokens
    assert texts["continued"].startswith(" Paris")
    assert usage["continued"] == len(model.tokens(prompt))  # no template around it
    assert usage["chat"] > usage["continued"]
    # Text that looks like a special token is read as text.
    assert usage["special"] == len(model.tokens("<|im_start|>")) > 1


async def test_logprobs_are_the_models_own_and_cover_the_text_sent(model: LocalModel) -> None:
    asked = [
        GenerationRequest(id="greedy", prompt=PROMPTS[0], max_tokens=24, logprobs=2),
        GenerationRequest(id="stopped", prompt=PROMPTS[2], max_tokens=48, logprobs=0, stop=("Blue", "blue")),
        GenerationRequest(id="plain", prompt=PROMPTS[0], max_tokens=24),
    ]
    texts: dict[str, str] = {r.id: "" for r in asked}
    weighed: dict[str, list[TokenLogprob]] = {r.id: [] for r in asked}
    async for token in model.generate(asked):
        texts[token.request_id] += token.text
        weighed[token.request_id] += token.logprobs
    assert "".join(e.token for e in weighed["greedy"]) == texts["greedy"]
    for entry in weighed["greedy"]:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy: each token was the likeliest
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6
    # Cut at a stop sequence: the logprobs cover the text sent and not the stop sequence's tokens.
    stopped = "".join(e.token for e in weighed["stopped"])
    assert texts["stopped"].startswith(stopped)
    assert "lue" not in stopped
    assert len(texts["stopped"]) - len(stopped) <= 1
    assert all(e.top_logprobs == [] for e in weighed["stopped"])
    assert weighed["plain"] == []  # not asked for


async def test_a_required_tool_call_is_a_call_of_an_offered_tool_with_arguments_that_fit(
    model: LocalModel,
) -> None:
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = (
        Tool(name="get_weather", description="The current weather in a city", parameters=city),
        Tool(name="get_population", description="How many people live in a city", parameters=city),
    )
    asked = [
        GenerationRequest(
            id="any",
            prompt="What is the weather in Paris?",
            max_tokens=48,
            tools=tools,
            tool_choice="required",
        ),
        GenerationRequest(
            id="named",
            prompt="How many people live in Rome?",
            max_tokens=48,
            tools=tools,
            tool_choice="required",
            tool_name="get_population",
        ),
    ]
    calls = {}
    async for token in PromptedTools(model).generate(asked):
        assert token.error is None
        assert token.text == ""
        if token.finish_reason:
            assert token.finish_reason == "tool_calls"
            (calls[token.request_id],) = token.tool_calls
    assert calls["any"].name in ("get_weather", "get_population")
    assert "Paris" in json.loads(calls["any"].arguments)["city"]
    assert calls["named"].name == "get_population"
    assert "Rome" in json.loads(calls["named"].arguments)["city"]


async def test_requests_waiting_for_a_slot_are_served_most_urgent_first(tmp_path: Path) -> None:
    model = LocalModel(cache_dir=tmp_path, slots=1, context_per_slot=256)
    try:
        # The first takes the only slot; the others wait for it, queued least urgent first.
        busy = GenerationRequest(id="busy", prompt=PROMPTS[0], max_tokens=16, priority=-9)
        queued = [
            GenerationRequest(id=f"p{p}", prompt=PROMPTS[1], max_tokens=2, priority=p) for p in (5, 0, -5)
        ]
        finished = [t.request_id async for t in model.generate([busy, *queued]) if t.finish_reason]
    finally:
        await model.close()
    assert finished == ["busy", "p-5", "p0", "p5"]


async def test_through_the_pipeline_a_more_urgent_request_overtakes_those_waiting(node: NodeFactory) -> None:
    settings = {"model": ModelSettings(backend="local", slots=1, context=512)}
    async with node(settings=settings) as http:
        busy = await submit(http, "Write a long story about a river.", max_tokens=160)
        events = await read_sse(http, busy, stop_after=4)
        assert events[-1][1] == "token"  # it holds the only slot now
        queued = {p: await submit(http, PROMPTS[1], max_tokens=2, priority=p) for p in (5, 0, -5)}
        views = {p: await wait_final(http, rid) for p, rid in queued.items()}
        assert (await wait_final(http, busy))["status"] == "completed"
    order = sorted(queued, key=lambda p: views[p]["stages"]["generate"]["finished_at"])
    assert order == [-5, 0, 5]


async def test_through_the_pipeline_tenants_take_turns_for_the_slots(
    node: NodeFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-acme=acme\nsk-globex=globex\n")
    acme, globex = {"Authorization": "Bearer sk-acme"}, {"Authorization": "Bearer sk-globex"}
    settings = {"model": ModelSettings(backend="local", slots=1, context=512), "api_keys_file": keys}

    async def asked(headers: dict[str, str], prompt: str, max_tokens: int) -> str:
        answer = await http.post(
            "/v1/requests", json={"prompt": prompt, "max_tokens": max_tokens}, headers=headers
        )
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    async with node(settings=settings) as http:
        busy = await asked(acme, "Write a long story about a river.", 160)
        async with http.stream("GET", f"/v1/requests/{busy}/events", headers=acme) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: token"):
                    break  # it holds the only slot now
        queued = [await asked(acme, PROMPTS[1], 2) for _ in range(3)] + [await asked(globex, PROMPTS[1], 2)]
        views = [
            await wait_final(http, rid, headers=headers)
            for rid, headers in zip(queued, [acme] * 3 + [globex], strict=True)
        ]
    finished = [view["stages"]["generate"]["finished_at"] for view in views]
    # acme was just served (its long story): globex's one request goes before acme's three.
    assert finished[3] < min(finished[:3])


async def test_a_prompt_too_long_for_the_context_is_the_clients_error_through_the_pipeline(
    node: NodeFactory,
) -> None:
    settings = {"model": ModelSettings(backend="local", slots=1, context=128)}
    async with node(settings=settings) as http, sdk(str(http.base_url)) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="smollm2-135m-instruct",
                messages=[{"role": "user", "content": PROMPTS[0]}],
                max_tokens=200,
            )
        rid = await submit(http, PROMPTS[0], max_tokens=200)
        view = await wait_final(http, rid)
    assert refused.value.code == "context_length_exceeded"
    assert "exceed the context of 128 tokens" in refused.value.message
    assert (view["status"], view["error"]["code"], view["error"]["stage"]) == (
        "failed",
        "context_length_exceeded",
        "generate",
    )


async def test_an_image_for_the_text_only_local_model_is_the_clients_error(node: NodeFactory) -> None:
    settings = {"model": ModelSettings(backend="local", slots=1, context=128)}
    async with node(settings=settings) as http, sdk(str(http.base_url)) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="smollm2-135m-instruct",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is it?"},
                            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                        ],
                    }
                ],
                max_tokens=8,
            )
    assert refused.value.code == "invalid_request"
    assert "reads text only, and the request has 1 image(s)" in refused.value.message


async def test_cancelling_one_request_frees_its_slot_and_the_others_finish_unchanged(
    model: LocalModel,
) -> None:
    prompts = PROMPTS[:3]
    solo = [(await run(model, [request(i, p, max_tokens=40)]))[f"r{i}"] for i, p in enumerate(prompts)]
    batch = [request(i, p, max_tokens=40) for i, p in enumerate(prompts)]
    victim = batch[1]
    seen: dict[str, list[Token]] = {r.id: [] for r in batch}
    async for token in model.generate(batch):
        seen[token.request_id].append(token)
        if token.request_id == victim.id and len(seen[victim.id]) == 2:
            victim.cancelled.set()  # takes effect within one decode step
    assert seen[victim.id][-1].finish_reason == "cancelled"
    assert len(seen[victim.id]) <= 4
    for i in (0, 2):
        tokens = seen[f"r{i}"]
        assert ("".join(t.text for t in tokens), tokens[-1].finish_reason) == solo[i]
    # The freed slot serves the next request at once.
    again = await asyncio.wait_for(run(model, [request(9, prompts[1], max_tokens=40)]), 30)
    assert again["r9"] == solo[1]


def test_an_engine_sized_outside_its_limits_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs 1-256 slots and at least 64 tokens"):
        LocalModel(cache_dir=tmp_path, slots=0)
    with pytest.raises(ValueError, match="got 4 slots and 16 tokens"):
        LocalModel(cache_dir=tmp_path, slots=4, context_per_slot=16)
    with pytest.raises(ValueError, match="unknown weights 'q3'; available: q8_0, f16, shipped"):
        LocalModel(cache_dir=tmp_path, weights="q3")
    assert not list(tmp_path.iterdir())  # nothing was made


@pytest.mark.parametrize("weights", ["f16", "shipped"])
def test_each_weight_type_runs_from_its_own_file_and_answers(tmp_path: Path, weights: str) -> None:
    assert tuple(WEIGHTS) == LOCAL_WEIGHTS  # what the settings accept is what the engine runs
    other = LocalModel(cache_dir=tmp_path, slots=2, context_per_slot=256, weights=weights)
    try:
        expected = "SmolLM2-135M-Instruct.F16.gguf" if weights == "f16" else shipped_gguf().name
        assert other.info.version.startswith(f"{expected}@")
        assert [p.name for p in tmp_path.iterdir()] == ([expected] if weights == "f16" else [])
        asked = [request(0, PROMPTS[0]), request(1, PROMPTS[3])]
        answers = asyncio.run(asyncio.wait_for(run(other, asked), 60))
        assert "Paris" in answers["r0"][0]
        assert all(text.strip() and finish in ("stop", "length") for text, finish in answers.values())
    finally:
        asyncio.run(other.close())


async def test_a_prompt_longer_than_the_context_fails_alone_and_for_good(model: LocalModel) -> None:
    tokens = [t async for t in model.generate([request(0, "queue " * 2000), request(1, PROMPTS[0])])]
    (refused,) = [t for t in tokens if t.error is not None]
    assert refused.request_id == "r0"
    assert isinstance(refused.error, PermanentError)
    assert "exceed the context" in str(refused.error)
    assert [t.finish_reason for t in tokens if t.request_id == "r1" and t.last] == ["stop"]  # batch-mate


async def test_embeddings_through_the_pipeline_put_alike_texts_close_and_refuse_an_overlong_one(
    node: NodeFactory,
) -> None:
    texts = ["The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly revenue grew 4 percent."]
    settings = {"model": ModelSettings(backend="local", slots=2, context=128)}
    async with node(settings=settings) as http, sdk(str(http.base_url)) as client:
        answer = await client.embeddings.create(
            model="smollm2-135m-instruct", input=texts, encoding_format="float"
        )
        with pytest.raises(openai.BadRequestError) as refused:
            await client.embeddings.create(model="smollm2-135m-instruct", input=["word " * 200, "short"])
    vectors = [d.embedding for d in answer.data]
    assert [len(v) for v in vectors] == [576] * 3
    assert all(sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4) for v in vectors)  # unit length

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.1
    assert answer.usage.prompt_tokens == sum(len(t.split()) for t in texts) + 6  # the model's own count
    assert refused.value.code == "context_length_exceeded"


async def test_a_prompt_far_over_the_context_is_refused_without_being_tokenized(model: LocalModel) -> None:
    # 2.9 MB: a second and a half of tokenizing on the worker's event loop. It cannot fit in 512
    # tokens however it tokenizes (no token stands for more than the longest piece's bytes).
    huge = request(0, "The queue absorbs the burst. " * 100_000, max_tokens=16)
    tokenized = model._tokenize
    model._tokenize = lambda *_, **__: pytest.fail("tokenized")  # type: ignore[method-assign]
    try:
        (token,) = [t async for t in model.generate([huge])]
    finally:
        model._tokenize = tokenized  # type: ignore[method-assign]
    assert isinstance(token.error, PermanentError)
    assert "exceed the context of 512 tokens per request" in str(token.error)


def test_every_token_decodes_whole(model: LocalModel) -> None:
    # Some of SmolLM2's pieces are longer than 64 bytes (rulers, indentation): a buffer of 64 made
    # them empty text, so a model writing a line of dashes lost it.
    pieces = [model._piece(t) for t in range(model._n_vocab)]
    assert max(map(len, pieces)) == model._longest_piece > 64
    long = next(t for t, piece in enumerate(pieces) if len(piece) > 64)
    assert model._tokenize(pieces[long], special=False) == [long]


async def test_an_input_far_over_the_context_is_refused_for_embedding_without_being_tokenized(
    model: LocalModel,
) -> None:
    tokenized = model._tokenize
    model._tokenize = lambda *_, **__: pytest.fail("tokenized")  # type: ignore[method-assign]
    try:
        with pytest.raises(PermanentError, match=r"at least \d+ tokens exceeds the context of 512"):
            await model.embed(["short", "The queue absorbs the burst. " * 100_000])
    finally:
        model._tokenize = tokenized  # type: ignore[method-assign]
