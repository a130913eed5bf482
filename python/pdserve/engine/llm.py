"""The offline API: `LLM(model=..., **engine_args).generate(prompts, sampling_params)`, vLLM-style."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import TokenLogprobs


@dataclass
class GenerateOutput:
    """One prompt's result. token_ids are the generated ids (prompt excluded)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] | None = (
        None  # one per token, when SamplingParams.logprobs is set
    )
    # one per prompt token (None for the first), when SamplingParams.prompt_logprobs is set
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class LLM:
    """Runs an engine to completion over a list of prompts (strings or token-id lists)."""

    def __init__(self, model: str = "tiny", **engine_args: Any):
        self.engine = LLMEngine(model=model, **engine_args)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[GenerateOutput]:
        """Returns one output per prompt, in prompt order. Bad prompts or params raise ValueError
        before anything is queued."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # one prompt
        if not isinstance(prompts, list | tuple) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts"
                )
        token_lists = []
        for prompt in prompts:
            if isinstance(prompt, str):
                token_lists.append(self.tokenizer.encode(prompt))
            elif isinstance(prompt, list | tuple):
                token_lists.append(list(prompt))
            else:
                raise ValueError(
                    f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}"
                )
        for i, tokens in enumerate(token_lists):  # validate all before queueing any
            self.engine._validate_prompt(f"validate-{i}", tokens)
        ids = []
        for tokens, params in zip(token_lists, params_list, strict=True):
            self._counter += 1
            request_id = f"llm-{self._counter}"
            self.engine.add_request(request_id, tokens, params)
            ids.append(request_id)
        generated: dict[str, list[int]] = {rid: [] for rid in ids}
        logprobs: dict[str, list[TokenLogprobs]] = {rid: [] for rid in ids}
        reasons: dict[str, Any] = {}
        cached: dict[str, int] = {}
        prompt_lps: dict[str, list[TokenLogprobs | None]] = {}
        try:
            while len(reasons) < len(ids):
                for out in self.engine.step():
                    if out.request_id not in generated:
                        continue  # a request someone else added to this engine
                    generated[out.request_id].extend(out.new_token_ids)
                    logprobs[out.request_id].extend(out.new_logprobs or [])
                    if out.prompt_logprobs is not None:
                        prompt_lps[out.request_id] = out.prompt_logprobs
                    if out.finished:
                        reasons[out.request_id] = out.finish_reason
                        cached[out.request_id] = out.num_cached_tokens
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [
            GenerateOutput(
                request_id=rid,
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=tokens,
                token_ids=generated[rid],
                text=self.tokenizer.decode(generated[rid]),
                finish_reason=reasons[rid],
                num_cached_tokens=cached[rid],
                logprobs=logprobs[rid] if params.logprobs is not None else None,
                prompt_logprobs=prompt_lps.get(rid),
            )
            for rid, prompt, tokens, params in zip(
                ids, prompts, token_lists, params_list, strict=True
            )
        ]

    def chat(
        self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None
    ) -> GenerateOutput:
        """One chat turn through the model's chat template."""
        return self.generate([self.tokenizer.encode_chat(messages)], sampling_params)[0]
