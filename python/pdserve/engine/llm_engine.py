"""The engine loop (DESIGN §3): requests in, one batched forward per step(), tokens out.

Three ways in: colocated, PREFILL_ONLY (per-layer hook, blocks pinned until release_request) and
DECODE_ONLY (from a reserve() reservation plus the first token). Not thread-safe: one thread drives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from pdserve.engine.block_manager import BlockManager, NoCapacity, Reservation
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.distributed import WorkerFailure
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch, Scheduler
from pdserve.engine.sequence import (
    FINISH_ABORT,
    RequestMode,
    RequestOutput,
    Sequence,
    SequenceStatus,
)
from pdserve.engine.tokenizer import Tokenizer
from pdserve.kv_layout import KVLayout

# layer_hook(layer_idx, [(request_id, block_ids_to_send), ...]) once each layer's KV is written; a step
# replayed from a CUDA graph calls it once with layer_idx None: every layer's KV is written
LayerHook = Callable[[int | None, list[tuple[str, list[int]]]], None]

__all__ = ["LLMEngine", "EngineStats", "NoCapacity", "Reservation", "RequestMode", "RequestOutput"]


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    num_pinned: int
    num_reserved_requests: int
    num_total_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_used_blocks: int
    num_reserved_blocks: int
    # cumulative prompt tokens served from the radix cache: not computed (a prompt admitted here) or
    # not received (a decode-side reservation); each request's prompt counts once per instance
    num_hit_tokens: int
    num_computed_prefill_tokens: int  # cumulative prompt tokens actually computed
    num_generated_tokens: int
    num_preemptions: int
    num_queued_prefill_tokens: int  # prompt tokens of waiting/running requests not computed yet
    num_evicted_blocks: int  # cumulative, by the watermark evictor
    num_demoted_blocks: int  # cumulative, device -> host tier
    num_promoted_blocks: int  # cumulative, host tier -> device
    num_host_total_blocks: int  # 0 without a host tier
    num_host_free_blocks: int
    num_host_cached_blocks: int
    block_size: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **engine_args: Any):
        self.config = config if config is not None else EngineConfig(**engine_args)
        cfg = self.config
        self.model_config = ModelConfig.load(cfg.model)
        mc = self.model_config
        self.max_model_len = min(
            cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        tok_dir = cfg.tokenizer or mc.model_dir
        self.tokenizer = (
            Tokenizer.from_dir(tok_dir, mc.eos_token_ids, mc.bos_token_id)
            if tok_dir
            else Tokenizer.byte_level()
        )
        eos_ids = mc.eos_token_ids or self.tokenizer.eos_token_ids
        if cfg.tensor_parallel_size > 1:
            from pdserve.engine.tp_worker import TensorParallelRunner

            # scheduling, blocks and the radix tree stay here; every rank runs each step on its shard
            self.runner = TensorParallelRunner(cfg, mc)
        else:
            self.runner = ModelRunner(cfg, mc)
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            cfg.block_size,
            cfg.enable_radix_caching,
            (cfg.evictor_high_watermark, cfg.evictor_low_watermark)
            if cfg.enable_radix_evictor
            else None,
            num_host_blocks=self.runner.num_host_blocks,
            copy_blocks=self._copy_ticket,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            eos_ids,
            cfg.max_num_seqs,
            cfg.max_num_batched_tokens,
            self.max_model_len,
            cfg.enable_chunked_prefill,
        )
        self.layer_hook: LayerHook | None = None
        self._seqs: dict[str, Sequence] = {}  # waiting, running and pinned requests
        self._pending: list[RequestOutput] = []  # outputs produced outside step()
        self._arrivals = 0
        self.num_generated_tokens = 0

    def _copy_ticket(self, ticket) -> bool:
        """Moves a demote/promote ticket's blocks between the device and host KV memories."""
        try:
            self.runner.copy_blocks(  # the runner takes lists (the ticket holds BlockIds)
                list(ticket.src_block_ids),
                list(ticket.dst_block_ids),
                to_host=ticket.kind == "demote",
            )
        except WorkerFailure:
            raise
        except (RuntimeError, IndexError):
            return False
        return True

    # ---- requests -----------------------------------------------------------------------------
    def _validate_prompt(self, request_id: str, prompt_token_ids: list[int]) -> list[int]:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._seqs:
            raise ValueError(f"request {request_id!r} is already in the engine")
        tokens = [int(t) for t in prompt_token_ids]
        if not tokens:
            raise ValueError(
                f"request {request_id!r}: the prompt is empty; give at least one token"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"request {request_id!r}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
            )
        if len(tokens) >= self.max_model_len:
            raise ValueError(
                f"request {request_id!r}: the prompt has {len(tokens)} tokens, but the model's context is "
                f"{self.max_model_len} (max_model_len); at most {self.max_model_len - 1} leave room to generate"
            )
        if (
            not self.config.enable_chunked_prefill
            and len(tokens) > self.config.max_num_batched_tokens
        ):
            raise ValueError(
                f"request {request_id!r}: the prompt has {len(tokens)} tokens, more than "
                f"max_num_batched_tokens={self.config.max_num_batched_tokens} without chunked prefill"
            )
        if self.block_manager.num_blocks_for(len(tokens) + 1) > self.block_manager.num_total_blocks:
            raise ValueError(
                f"request {request_id!r}: the prompt needs {self.block_manager.num_blocks_for(len(tokens) + 1)} "
                f"KV blocks, the whole cache has {self.block_manager.num_total_blocks}"
            )
        return tokens

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        *,
        mode: RequestMode = RequestMode.COLOCATED,
        num_peer_cached_tokens: int = 0,
        first_token_id: int | None = None,
        pin_on_finish: bool = False,
    ) -> None:
        """Queues a request (see DESIGN §3 for the modes). Raises ValueError on bad input, taking nothing.

        pin_on_finish: a finished request keeps its blocks (get_block_ids / get_token_ids still work)
        until release_request, e.g. to send the decoded KV back to the prefill instance (dcache).
        PREFILL_ONLY requests are always pinned.
        """
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self._seqs:
            raise ValueError(f"request {request_id!r} is already in the engine")
        vocab = self.model_config.vocab_size
        outside = [t for t in params.logit_bias or {} if t >= vocab]
        if outside:
            raise ValueError(
                f"request {request_id!r}: logit_bias names token ids {outside[:5]} outside the "
                f"vocabulary [0, {vocab})"
            )
        if params.allowed_token_ids and params.allowed_token_ids[-1] >= vocab:  # sorted
            outside = [t for t in params.allowed_token_ids if t >= vocab]
            raise ValueError(
                f"request {request_id!r}: allowed_token_ids names token ids {outside[:5]} outside "
                f"the vocabulary [0, {vocab})"
            )
        if params.num_prior_output_tokens and params.num_prior_output_tokens >= len(
            prompt_token_ids
        ):
            raise ValueError(
                f"request {request_id!r}: num_prior_output_tokens={params.num_prior_output_tokens} "
                f"must be below the prompt length {len(prompt_token_ids)} (the prompt holds them)"
            )
        # the sequence keeps its own copy holding the EOS/stop ids min_tokens bans (else params)
        params = params.with_min_tokens_resolved(sorted(self.scheduler.eos_token_ids), vocab)
        if mode is RequestMode.DECODE_ONLY:
            if params.prompt_logprobs is not None:  # the prefill instance computed the prompt
                params = replace(params, prompt_logprobs=None)
            self._add_decode_only(
                request_id, prompt_token_ids, params, first_token_id, pin_on_finish
            )
            return
        tokens = self._validate_prompt(request_id, prompt_token_ids)
        seq = Sequence(request_id, tokens, len(tokens), params, mode, self._next_arrival())
        seq.pin_on_finish = pin_on_finish
        if mode is RequestMode.PREFILL_ONLY:
            bs = self.config.block_size
            if not 0 <= num_peer_cached_tokens <= len(tokens) or num_peer_cached_tokens % bs:
                raise ValueError(
                    f"request {request_id!r}: num_peer_cached_tokens={num_peer_cached_tokens} must be a multiple "
                    f"of block_size={bs} between 0 and the prompt length {len(tokens)}"
                )
            seq.num_peer_cached_tokens = num_peer_cached_tokens
        elif mode is not RequestMode.COLOCATED:
            raise ValueError(f"mode must be a RequestMode, got {mode!r}")
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def _add_decode_only(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        first_token_id: int | None,
        pin_on_finish: bool,
    ) -> None:
        if not self.block_manager.has_reservation(request_id):
            raise ValueError(
                f"request {request_id!r}: DECODE_ONLY needs a reserve() for this id first"
            )
        if first_token_id is None or not 0 <= int(first_token_id) < self.model_config.vocab_size:
            raise ValueError(
                f"request {request_id!r}: DECODE_ONLY needs first_token_id in [0, {self.model_config.vocab_size}), "
                f"got {first_token_id!r}"
            )
        tokens = [int(t) for t in prompt_token_ids]
        reserved = self.block_manager.get_reservation(request_id)
        if tokens != reserved.prompt_token_ids:
            raise ValueError(
                f"request {request_id!r}: prompt differs from the one given to reserve()"
            )
        reservation = self.block_manager.take_reservation(request_id)
        seq = Sequence(
            request_id, tokens + [int(first_token_id)], len(tokens), params, RequestMode.DECODE_ONLY
        )
        seq.arrival_index = self._next_arrival()
        seq.block_ids = reservation.block_ids
        seq.num_computed_tokens = len(tokens)
        seq.num_cached_tokens = reservation.num_cached_tokens
        seq.pin_on_finish = pin_on_finish
        self._seqs[request_id] = seq
        reason = self.scheduler.check_stop(seq)
        if reason is not None:  # the first token already ends it
            self.scheduler._finish(seq, reason)
            self._pending.append(self._output(seq))
            if seq.status is SequenceStatus.FINISHED:
                del self._seqs[request_id]
            return
        self.scheduler.add(seq)

    def _next_arrival(self) -> int:
        self._arrivals += 1
        return self._arrivals

    def reserve(
        self, request_id: str, prompt_token_ids: list[int], count_hits: bool = True
    ) -> Reservation:
        """Decode side: lock the cached prefix, reserve blocks for the rest. Raises NoCapacity (nothing
        taken) or ValueError (bad prompt, id in use). count_hits: the cached prefix counts in
        `num_hit_tokens` (a prompt's KV to receive; not a lock taken to move KV back, dcache)."""
        if request_id in self._seqs:
            raise ValueError(f"request {request_id!r} is already in the engine")
        tokens = self._validate_prompt(request_id, prompt_token_ids)
        return self.block_manager.reserve(request_id, tokens, count_hits=count_hits)

    def release_request(self, request_id: str) -> int:
        """Frees whatever the request holds (pinned prefill blocks, a reservation, or a live request,
        which is aborted). Returns the number of block references dropped; 0 for an unknown id."""
        released = self.block_manager.release_reservation(request_id)
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(request_id)
            released += len(seq.block_ids)
            self.block_manager.release(seq, cache=True)
            if seq.status is not SequenceStatus.PINNED:
                seq.finish_reason = seq.finish_reason or FINISH_ABORT
            seq.status = SequenceStatus.FINISHED
        return released

    def abort_request(self, request_id: str) -> bool:
        """Stops a request at any point and returns every block it holds. True if it was known."""
        known = request_id in self._seqs or self.block_manager.has_reservation(request_id)
        self.release_request(request_id)
        return known

    def insert_cached(self, token_ids: list[int], block_ids: list[int]) -> int:
        """Adopts received blocks into the radix tree (block i holds tokens [i*bs, (i+1)*bs)). The caller
        keeps its references (e.g. a reservation: release_request afterwards). Returns blocks adopted."""
        return self.block_manager.insert_cached(list(token_ids), list(block_ids))

    def cache_reservation(self, request_id: str) -> int:
        """Decode side, for a request that ended at its first token (on P) after its KV arrived: the
        reservation's whole prompt blocks go into the radix tree; the reservation still holds them
        (release_request afterwards). Returns blocks adopted (0 without caching); KeyError if the id
        holds no reservation."""
        reservation = self.block_manager.get_reservation(request_id)
        if reservation is None:
            raise KeyError(f"request {request_id!r} holds no reservation")
        return self.block_manager.insert_cached(reservation.prompt_token_ids, reservation.block_ids)

    def get_block_ids(self, request_id: str) -> list[int]:
        """Block ids a live or pinned request holds (block i = tokens [i*bs, (i+1)*bs)); a copy."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise KeyError(f"unknown request {request_id!r}")
        return list(seq.block_ids)

    def get_token_ids(self, request_id: str) -> tuple[list[int], int]:
        """(prompt + generated token ids, num_computed_tokens) of a live or pinned request: tokens
        [0, num_computed_tokens) have their KV in get_block_ids(request_id)."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise KeyError(f"unknown request {request_id!r}")
        return list(seq.token_ids), seq.num_computed_tokens

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- the loop -----------------------------------------------------------------------------
    def _hook_items(self, batch: ScheduledBatch) -> list[tuple[str, list[int]]]:
        """Blocks each PREFILL_ONLY request sends this step: every block is sent once, in the step
        that completes it (the prompt's last, partial block in its final step), from the peer's
        cached prefix on; blocks this instance had cached go out with the first step."""
        bs = self.config.block_size
        items = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            if seq.mode is not RequestMode.PREFILL_ONLY:
                continue
            done = seq.num_computed_tokens + n
            end = -(-seq.num_prompt_tokens // bs) if batch.samples(i) else done // bs
            start = max(seq.num_peer_cached_tokens // bs, seq.num_sent_blocks)
            if end > start:
                items.append((seq.request_id, seq.block_ids[start:end]))
                seq.num_sent_blocks = end
        return items

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns an output for every request that got tokens or finished."""
        outputs, self._pending = self._pending, []
        batch, dropped = self.scheduler.schedule()
        for seq in dropped:
            outputs.append(self._output(seq))
            if seq.status is SequenceStatus.FINISHED:
                self._seqs.pop(seq.request_id, None)
        if not batch.seqs:
            return outputs
        after_layer = None
        items = self._hook_items(batch) if self.layer_hook is not None else []
        if items:
            hook = self.layer_hook

            def after_layer(layer_idx: int | None) -> None:
                hook(layer_idx, items)

        sampled = self.runner.run(batch, after_layer)
        self.scheduler.postprocess(
            batch, sampled.token_ids, sampled.logprobs, sampled.prompt_logprobs
        )
        self.block_manager.run_evictor()
        for seq in batch.seqs:
            if seq.num_new_tokens_unreported or seq.is_finished:
                outputs.append(self._output(seq))
                if seq.status is SequenceStatus.FINISHED:
                    self._seqs.pop(seq.request_id, None)
        return outputs

    def _output(self, seq: Sequence) -> RequestOutput:
        n = seq.num_new_tokens_unreported
        seq.num_new_tokens_unreported = 0
        self.num_generated_tokens += n
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=seq.token_ids[len(seq.token_ids) - n :] if n else [],
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
            new_logprobs=(seq.output_logprobs[len(seq.output_logprobs) - n :] if n else [])
            if seq.params.logprobs is not None
            else None,
            # with the first tokens reported (then every generated token is among the n)
            prompt_logprobs=list(seq.prompt_logprobs)
            if seq.params.prompt_logprobs is not None and n and n == seq.num_output_tokens
            else None,
        )

    # ---- introspection ------------------------------------------------------------------------
    def kv_layout(self) -> KVLayout:
        """Where rank 0's KV pieces live (the whole cache when tensor_parallel_size is 1): the
        `pdserve.transfer` layout, ready to register and send from."""
        return self.runner.kv_layout()

    def kv_layouts(self) -> list[KVLayout]:
        """One KVLayout per tensor-parallel rank (index = rank): rank i holds num_kv_heads / tp_size
        heads of every block, under the same block ids; addresses are valid in this process. A transfer
        sends rank i's pieces to the peer's rank i."""
        return self.runner.kv_layouts()

    def kv_caches(self) -> list[Any]:
        """Each rank's KV tensor (index = rank; torch tensors in kv_layout's shape, sharing the ranks'
        memory), the tensor form of kv_layouts()."""
        return self.runner.rank_kv_caches()

    def shutdown(self) -> None:
        """Stops tensor-parallel workers (no-op with one rank); the engine cannot step afterwards."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def stats(self) -> EngineStats:
        pool = self.block_manager.pool
        host = self.block_manager.host_pool
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_pinned=sum(1 for s in self._seqs.values() if s.status is SequenceStatus.PINNED),
            num_reserved_requests=self.block_manager.num_reservations,
            num_total_blocks=pool.num_total,
            num_free_blocks=pool.num_free,
            num_cached_blocks=pool.num_cached,
            num_used_blocks=pool.num_in_use,
            num_reserved_blocks=pool.num_reserved,
            num_hit_tokens=self.block_manager.num_hit_tokens,
            num_computed_prefill_tokens=self.scheduler.num_computed_prefill_tokens,
            num_generated_tokens=self.num_generated_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_queued_prefill_tokens=sum(
                max(0, s.num_prompt_tokens - s.num_computed_tokens)
                for s in [*self.scheduler.waiting, *self.scheduler.running]
            ),
            num_evicted_blocks=self.block_manager.num_evicted_blocks,
            num_demoted_blocks=self.block_manager.num_demoted_blocks,
            num_promoted_blocks=self.block_manager.num_promoted_blocks,
            num_host_total_blocks=host.num_total if host is not None else 0,
            num_host_free_blocks=host.num_free if host is not None else 0,
            num_host_cached_blocks=host.num_cached if host is not None else 0,
            block_size=self.config.block_size,
        )

    def drain_cache_events(self) -> list[Any]:
        """Radix-tree events since the last call (inserted/evicted/...); [] without radix caching."""
        tree = self.block_manager.tree
        return list(tree.drain_events()) if tree is not None else []

    def check_invariants(self) -> None:
        """Raises if the block pool's accounting is broken (free + cached + in_use == total)."""
        self.block_manager.check_invariants()
