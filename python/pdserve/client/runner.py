"""Runs a benchmark: builds the workload, releases conversations at their Poisson arrival times,
sends each turn after the previous answer, and collects one record per request.

`run_benchmark` is the programmatic entry point (`pdserve bench` and `pdserve demo` call it).
"""

from __future__ import annotations

import asyncio
import datetime
import random
import sys
import time
from typing import Any

import aiohttp

from pdserve.client.metrics import RequestRecord, summarize
from pdserve.client.openai_client import endpoint_url, fetch_model_id, send_request
from pdserve.client.results import BenchConfig, BenchResult
from pdserve.client.workloads import (
    Conversation,
    Turn,
    build_random_workload,
    build_sharegpt_workload,
    chat_messages,
    completion_prompt,
    poisson_arrival_times,
)
from pdserve.server.auth import bearer_headers

DEFAULT_RANDOM_TURNS = 4  # random multi-turn conversations without --max-turns


def build_workload(config: BenchConfig) -> list[Conversation]:
    """The conversations of a run with their arrival offsets; the same config and seed always
    give the same workload. Raises `ValueError` on a bad config, `FileNotFoundError` without data."""
    config.validate()
    rng = random.Random(config.seed)
    if config.dataset == "random":
        num_turns = (config.max_turns or DEFAULT_RANDOM_TURNS) if config.multi_turn else 1
        conversations = build_random_workload(
            config.num_requests,
            config.input_len,
            config.output_len,
            rng=rng,
            use_token_ids=config.uses_token_ids(),
            num_turns=num_turns,
            token_id_range=config.token_id_range,
            chars_per_token=config.chars_per_token,
        )
    else:
        from pdserve.client.sharegpt import load_sharegpt

        dialogues = [(c.conversation_id, c.turns) for c in load_sharegpt(config.sharegpt_path)]
        conversations = build_sharegpt_workload(
            dialogues,
            config.num_requests,
            rng=rng,
            output_len=config.output_len,
            max_turns=config.max_turns if config.multi_turn else 1,
            max_input_chars=config.max_input_chars,
            chars_per_token=config.chars_per_token,
        )
    # A separate generator, so arrival times do not shift when the prompt sampling changes.
    arrivals = poisson_arrival_times(
        len(conversations), config.request_rate, random.Random(config.seed + 0x5EED)
    )
    for conversation, arrival_s in zip(conversations, arrivals, strict=True):
        conversation.arrival_time_s = arrival_s
    return conversations


def request_body(
    config: BenchConfig, model: str, turn: Turn, history: list[tuple[str, str]]
) -> dict[str, Any]:
    """The JSON body of one turn's request (history = earlier (user, answer) pairs)."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": turn.max_tokens,
        "temperature": config.temperature,
        "stream": config.stream,
    }
    if config.ignore_eos:
        body["ignore_eos"] = True  # vLLM-style extension: exact output lengths
    if config.stream:
        body["stream_options"] = {"include_usage": True}
    if config.endpoint == "chat":
        body["messages"] = chat_messages(history, turn.user_text)
    elif turn.prompt_token_ids is not None:
        body["prompt"] = list(turn.prompt_token_ids)
    elif config.dataset == "random" and not config.multi_turn:
        body["prompt"] = turn.user_text  # plain random words, no chat template
    else:
        body["prompt"] = completion_prompt(history, turn.user_text)
    if config.extra_body:
        body.update(config.extra_body)  # validate() keeps it off the fields set above
    return body


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of prompt text in a request body (0 for token ids)."""
    if "messages" in body:
        return sum(len(m["content"]) for m in body["messages"])
    return len(body["prompt"]) if isinstance(body["prompt"], str) else 0


class _Run:
    """State shared by the conversations of one run."""

    def __init__(
        self, config: BenchConfig, model: str, session: aiohttp.ClientSession, progress: Any
    ):
        self.config = config
        self.model = model
        self.session = session
        self.url = endpoint_url(config.url, config.endpoint)
        self.progress = progress
        self.records: list[RequestRecord] = []
        self.num_turns_skipped = 0
        self.limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        self.start = time.perf_counter()

    async def conversation(self, conversation: Conversation) -> None:
        delay = conversation.arrival_time_s - (time.perf_counter() - self.start)
        if delay > 0:
            await asyncio.sleep(delay)
        for turn_index, turn in enumerate(conversation.turns):
            body = request_body(self.config, self.model, turn, conversation.history)
            chars = prompt_chars(body)
            if turn_index > 0 and chars > self.config.max_input_chars:
                self._skip(len(conversation.turns) - turn_index)  # the history outgrew the cap
                return
            record = RequestRecord(
                request_id=len(self.records),
                conversation_id=conversation.conversation_id,
                turn_index=turn_index,
                scheduled_offset_s=conversation.arrival_time_s,
                max_tokens=turn.max_tokens,
                prompt_chars=chars,
            )
            self.records.append(record)
            await self._send(body, record)
            if record.prompt_tokens is None:
                record.prompt_tokens = (
                    len(body["prompt"])
                    if isinstance(body.get("prompt"), list)
                    else max(1, round(chars / self.config.chars_per_token))
                )
            if self.progress is not None:
                self.progress.update(1)
            if not record.ok:
                self._skip(len(conversation.turns) - turn_index - 1)
                return
            conversation.history.append((turn.user_text, record.output_text))

    async def _send(self, body: dict[str, Any], record: RequestRecord) -> None:
        if self.limit is not None:
            async with self.limit:
                await self._send_now(body, record)
        else:
            await self._send_now(body, record)

    async def _send_now(self, body: dict[str, Any], record: RequestRecord) -> None:
        record.start_offset_s = time.perf_counter() - self.start
        await send_request(
            self.session,
            self.url,
            body,
            record,
            endpoint=self.config.endpoint,
            timeout_s=self.config.timeout_s,
        )

    def _skip(self, num_turns: int) -> None:
        self.num_turns_skipped += num_turns
        if self.progress is not None and num_turns:
            self.progress.update(num_turns)


async def run_benchmark(config: BenchConfig) -> BenchResult:
    """Runs the benchmark `config` describes against `config.url` and returns every request's
    record and the summary. Request failures are recorded, not raised; raises `ValueError` for a
    bad config and `RuntimeError` when no model is given and `/v1/models` cannot name one."""
    conversations = build_workload(config)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    connector = aiohttp.TCPConnector(limit=0)  # concurrency is the workload's, not the pool's
    headers = bearer_headers(config.api_key)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        model = config.model or await fetch_model_id(session, config.url)
        progress = _progress_bar(config, sum(len(c.turns) for c in conversations))
        run = _Run(config, model, session, progress)
        try:
            await asyncio.gather(*(run.conversation(c) for c in conversations))
        finally:
            if progress is not None:
                progress.close()
        duration_s = time.perf_counter() - run.start
    summary = summarize(
        run.records, duration_s, slo_ttft_ms=config.slo_ttft_ms, slo_tpot_ms=config.slo_tpot_ms
    )
    return BenchResult(
        config=config,
        model=model,
        started_at=started_at,
        records=run.records,
        summary=summary,
        num_turns_skipped=run.num_turns_skipped,
    )


def _progress_bar(config: BenchConfig, total: int) -> Any:
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", file=sys.stderr, dynamic_ncols=True)
