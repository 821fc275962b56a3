"""The engine: continuous batching over a runner, with streaming results.

One engine per process. ``generate`` is called from asyncio, and the batch runs as a
task on the same event loop, one step at a time, yielding to the loop between steps
(HTTP parsing and streaming happen there). Not a separate thread: on CPU, OpenMP
parallel regions started from a secondary thread ran the decode GEMMs about 2.5x
slower than from the main thread here (43 vs 23 tok/s at batch 1 on SmolLM2), so the
step stays on the thread that serves the loop. Every step:

1. takes in new requests, cancellations and commands (adapter installs);
2. asks the :class:`~.scheduler.Scheduler` for the step's rows: running sequences, then
   waiting ones admitted under ``max_batch_size``, the per-step prefill token budget
   (long prompts are prefilled in chunks, so running streams keep getting a token every
   step) and free KV blocks; when the KV pool runs dry the newest sequence is preempted
   and recomputed later, instead of failing. Block tables, the prefix cache and forks
   are the :class:`~.block_manager.BlockManager`'s;
3. runs one ``runner.step`` for all rows, each with its own adapter (under fair
   scheduling, in the compiled step's stages where it has several: between two, a new
   tenant's prompt is prefilled in a step of its own, see :meth:`Engine._between_stages`);
4. samples, detokenizes, checks stops, streams each token, and retires finished
   sequences at once, freeing their blocks.

Between two steps the loop ticks a few times for the HTTP layer, and waits (up to 10 ms)
while a generation request is still on its way to the engine (:mod:`openllm_clone.arrivals`),
so that a request whose body came in after its headers does not miss the next step.

A request with ``n > 1`` prefills its prompt once; its samples then share the
prompt's full KV blocks and copy only the last partial one.

Log-probabilities are ``log_softmax`` of the logits the model gave the row (its adapter
included), before penalties, biases, grammar masks and temperature, as vLLM's default
``raw_logprobs``. Only rows that ask pay: a generated token's costs one ``log_softmax`` of
its row; prompt logprobs make the runner return every prompt position's logits for that
request alone (its prompt then bypasses the prefix cache, whose blocks have no logits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from openllm_clone import arrivals
from openllm_clone._memory import HeapTrimmer
from openllm_clone.errors import (
    CapacityError,
    InvalidRequestError,
    OpenLLMCloneError,
    RequestTimeoutError,
)
from openllm_clone.protocol import SamplingParams, new_request_id
from openllm_clone.runners.base import ModelRunner, StepRow, logit_rows

from .block_manager import BlockManager
from .config import EngineConfig, EngineObserver
from .faults import isolate_faults
from .kv_cache import BlockAllocator, blocks_for
from .sampling import grammar_mask, prompt_logprobs, sample_rows, token_logprobs
from .scheduler import ScheduledRow, Scheduler
from .sequence import (
    AdapterRef,
    RequestGroup,
    RequestOutput,
    SeqDelta,
    SeqStatus,
    Sequence,
    TokenLogprob,
)

__all__ = ["Engine", "EngineConfig", "EngineObserver"]

logger = logging.getLogger(__name__)

_TICKS_BETWEEN_STEPS = 8
# At most this long between two steps for requests on their way to the engine.
_ARRIVAL_WAIT_S = 0.01
# At most this long between two steps for the HTTP handlers to take the step's outputs.
_FLUSH_WAIT_S = 0.005
# An idle engine whose runner has work between steps (a background compile to pick up)
# looks again this often.
_IDLE_POLL_S = 1.0
# Loop ticks between two stages of a step (fair scheduling), for requests coming in.
_TICKS_BETWEEN_STAGES = 4


class Engine:
    """Continuous-batching engine over a :class:`~openllm_clone.runners.base.ModelRunner`."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.blocks = BlockAllocator(
            runner.num_blocks, runner.block_size, prefix_caching=self.config.prefix_caching
        )
        self.max_model_len = runner.info.max_model_len
        self.eos_ids = self._eos_ids(runner, tokenizer)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._deferred: list[tuple[str, Any]] = []  # taken in between stages, run after
        self.block_manager = BlockManager(self.blocks)
        self.scheduler = Scheduler(
            self.block_manager,
            max_batch_size=self.config.max_batch_size,
            max_prefill_tokens=self.config.max_prefill_tokens,
            fair=self.config.fair,
        )
        self._groups: dict[str, RequestGroup] = {}
        self._pending = 0  # requests accepted but not yet finished
        self._stop = False
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        # Seeds for sampled requests that give none: reproducible per server start.
        self._seeds = random.Random(self.config.seed)
        self.steps = 0
        self.faults_isolated = 0  # rows failed alone after a batched step raised
        self.interjections = 0  # new tenants' prompts run between two stages of a step
        # Servers hand glibc's free heap pages back now and then (openllm_clone/_memory.py).
        self.heap_trimmer: HeapTrimmer | None = None
        # Tests only (never set from HTTP): called with a step's rows before the forward.
        self.fault_hook: Callable[[list[StepRow]], None] | None = None

    @staticmethod
    def _eos_ids(runner: ModelRunner, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for source in (
            getattr(tokenizer, "eos_token_id", None),
            getattr(getattr(runner.model, "generation_config", None), "eos_token_id", None),
            getattr(runner.config, "eos_token_id", None),
        ):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list | tuple):
                ids.update(int(i) for i in source)
        return ids

    # --- public API (asyncio side) -----------------------------------------------------

    @property
    def num_pending(self) -> int:
        """Requests accepted and not finished."""
        return self._pending

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if the prompt and output cannot fit the context."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty after tokenization", param="prompt")
        vocab = self.runner.info.vocab_size
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise InvalidRequestError(
                f"prompt token ids must lie in 0..{vocab - 1}", param="prompt"
            )
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise InvalidRequestError(
                f"logit_bias token id {max(params.logit_bias)} is outside the "
                f"vocabulary (0..{vocab - 1})",
                param="logit_bias",
            )
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                f"({params.max_new_tokens}) = {total} exceeds the model's context of "
                f"{self.max_model_len} tokens",
                param="max_new_tokens",
            )
        needed = blocks_for(total, self.blocks.block_size)
        if needed > self.blocks.num_blocks - 1:
            raise InvalidRequestError(
                f"the request needs {needed} KV blocks; the cache has "
                f"{self.blocks.num_blocks - 1} (raise --kv-cache-mb)",
                param="max_new_tokens",
            )

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        adapter: AdapterRef | None = None,
        request_id: str | None = None,
        constraint: Any = None,
        timeout: float | None = None,
        tenant: str | None = None,
        weight: float = 1.0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator cancels the request.

        ``constraint`` (a :class:`~openllm_clone.structured.Constraint`) masks, at every
        step, the tokens its grammar does not allow.
        """
        self.check_prompt(prompt_ids, params)
        if self._pending >= self.config.max_queue + self.config.max_batch_size:
            raise CapacityError(
                f"the server is busy: {self._pending} requests in flight", retry_after=1.0
            )
        self._pending += 1
        self._ensure_running()
        group = RequestGroup(
            request_id=request_id or new_request_id(),
            prompt_ids=list(prompt_ids),
            params=params,
            adapter=adapter,
            queue=asyncio.Queue(),
            constraint=constraint,
            tenant=tenant,
            weight=weight,
        )
        if timeout is not None:
            group.deadline = group.arrival + timeout
        arrivals.reached()
        self._send("add", group)
        finished = False
        try:
            while True:
                out = await group.queue.get()
                if out.error is not None:
                    finished = True
                    if out.error_status == RequestTimeoutError.status_code:
                        raise RequestTimeoutError(out.error)
                    raise OpenLLMCloneError(out.error)
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._send("cancel", group.request_id)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` between two steps (no step ever sees it half-done)."""
        loop = self._ensure_running()
        future: asyncio.Future[Any] = loop.create_future()
        self._send("call", (fn, future))
        return await future

    def stats(self) -> dict[str, int]:
        """Queue, batch and KV usage now."""
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "pending": self._pending,
            "kv_blocks_used": self.blocks.num_used,
            "kv_blocks_total": self.blocks.num_blocks - 1,
            "kv_blocks_peak": self.blocks.peak_used,
            "block_size": self.blocks.block_size,
            "kv_bytes_per_token": int(self.runner.kv_bytes_per_token),
            "prefix_cache_blocks": self.blocks.num_cached,
            "prefix_cache_hits": self.blocks.prefix_hits,
            "prefix_cache_queries": self.blocks.prefix_queries,
            "heap_trims": self.heap_trimmer.trims if self.heap_trimmer is not None else 0,
            "interjections": self.interjections,
        }

    def shutdown(self) -> None:
        """Stop the step loop; pending requests end with an error."""
        self._stop = True
        for group in list(self._groups.values()):
            self._fail(group, "the engine is shutting down")
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                task.get_loop().call_soon_threadsafe(task.cancel)

    def _ensure_running(self) -> asyncio.AbstractEventLoop:
        """Start the step loop on the running event loop (again, if that loop changed)."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            if task is not None and task.get_loop() is not loop:
                # The old loop is gone (tests run one loop per test): drop its requests.
                for group in list(self._groups.values()):
                    self._finish_group(group, "cancelled")
            self._stop = False
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="openllm-clone-engine")
        return loop

    def _send(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        if self._wake is not None:
            self._wake.set()

    # --- the step loop --------------------------------------------------------------------

    async def _run(self) -> None:
        torch.set_grad_enabled(False)
        assert self._wake is not None
        while not self._stop:
            self._drain_inbox()
            self._expire()
            if not self.scheduler:
                self._wake.clear()
                if self._inbox.empty():
                    if self.runner.idle():  # a background compile to pick up when done
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), _IDLE_POLL_S)
                    else:
                        await self._wake.wait()
                continue
            worked = True
            try:
                worked = await self._step()
            except Exception as exc:  # a bug or a kernel failure: fail the batch, keep serving
                logger.exception("engine step failed")
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._fail(seq.group, f"internal error during generation: {exc}")
            if self.heap_trimmer is not None:  # servers: see openllm_clone/_memory.py
                self.heap_trimmer.after_step(worked=worked, idle=not self.scheduler)
            # Let HTTP handlers run (and new requests arrive) between steps. One tick is
            # not enough: starting a stream takes a handful of callbacks in a row, and
            # each tick would otherwise cost a whole step.
            if worked:
                await _ticks(_TICKS_BETWEEN_STEPS)
                await self._flush_streams()
                # Requests still on their way through the HTTP layer (a body not read
                # yet) would otherwise wait for a whole step more: wait a little for them.
                await _wait_for_arrivals(lambda: arrivals.pending() > 0)
            else:
                await asyncio.sleep(0.001)

    async def _flush_streams(self) -> None:
        """Tick the loop until every request's handler has taken its outputs (bounded):
        the step's tokens go out to the clients together, here, rather than bit by bit
        in the ticks between the next step's stages, which cost the stages' throughput
        (~5 % measured with 64 streams, the clients on the same 2 cores)."""
        deadline = time.perf_counter() + _FLUSH_WAIT_S
        while time.perf_counter() < deadline:
            if all(g.queue.empty() for g in self._groups.values()):
                return
            await asyncio.sleep(0)

    def _expire(self) -> None:
        """Fail requests past their deadline (their slots and blocks are freed now)."""
        now = time.perf_counter()
        for group in [
            g for g in self._groups.values() if g.deadline is not None and now > g.deadline
        ]:
            limit = group.deadline - group.arrival  # type: ignore[operator]
            self._fail(
                group,
                f"request timed out after {limit:.0f} s",
                status=RequestTimeoutError.status_code,
            )

    def _drain_inbox(self, *, only_adds: bool = False) -> None:
        """Take in what the asyncio side sent. ``only_adds``: new requests only; the rest
        is kept, in order, for the next full drain."""
        if not only_adds and self._deferred:
            deferred, self._deferred = self._deferred, []
            for item in deferred:
                self._handle(*item)
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if only_adds and (kind != "add" or self._deferred):
                self._deferred.append((kind, payload))
            else:
                self._handle(kind, payload)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            self._add(payload)
        elif kind == "cancel":
            group = self._groups.get(payload)
            if group is not None:
                group.cancelled = True
                self._finish_group(group, "cancelled")
        elif kind == "call":
            fn, future = payload
            if future.cancelled():
                return
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _add(self, group: RequestGroup) -> None:
        self._groups[group.request_id] = group
        seed = group.params.seed
        if seed is None and not group.params.greedy:
            seed = self._seeds.getrandbits(63)
        # All n samples are created now; only the first prefills, the rest fork from it.
        for i in range(group.params.n):
            gen = None
            if not group.params.greedy:
                gen = torch.Generator().manual_seed((int(seed or 0) + i) % 2**63)
            group.seqs.append(Sequence(group, i, self.tokenizer, gen))
        params = group.params
        if params.max_new_tokens == 0 and params.prompt_logprobs is None and not params.pooling:
            self._finish_scoring(group)  # nothing to compute
            return
        self.scheduler.add(group.seqs[0])

    async def _step(self) -> bool:
        """Run one step; False when nothing could be scheduled."""
        rows = self.scheduler.schedule()
        if not rows:
            return False
        await self._execute(rows, staged=self.scheduler.fair)
        return True

    async def _execute(self, rows: list[ScheduledRow], *, staged: bool = False) -> None:
        """Run ``rows`` through the model, then sample, stream and retire. ``staged``: in
        the runner's stages, with new tenants' prompts run between two (see
        :meth:`_between_stages`)."""
        step_rows = [
            StepRow(
                token_ids=r.tokens,
                start_pos=r.seq.num_cached,
                block_table=r.seq.block_table,
                adapter_slot=r.seq.group.adapter_slot,
                need_logits=r.need_logits,
                all_logits=r.seq.wants_all_logits,
                hidden=r.seq.params.pooling is not None,
            )
            for r in rows
        ]
        try:
            if staged:
                logits = await self._forward_staged(step_rows, rows)
            else:
                logits = self._forward(step_rows)
        except Exception:
            logger.exception("a batched step failed: looking for the rows that fail alone")
            rows, step_rows, logits = self._isolate_fault(rows, step_rows)
            if not rows:
                return
        self.steps += 1
        for r in rows:
            r.seq.num_cached += len(r.tokens)
            self.block_manager.register(r.seq)
        sampled: list[Sequence] = []
        last_rows: list[int] = []  # each sampled row's logits: the last of the row's share
        at = 0
        for r, row in zip(rows, step_rows, strict=True):
            seq = r.seq
            k = logit_rows(row)
            if row.all_logits:
                prompt_logprobs(seq, row, logits[at : at + k])
            if row.hidden:
                seq.group.keep_hidden(row.start_pos, row.hidden_states)
            if r.need_logits:
                if seq.params.max_new_tokens == 0:
                    self._finish_scoring(seq.group)
                else:
                    sampled.append(seq)
                    last_rows.append(at + k - 1)
            at += k
        if sampled:
            if len(last_rows) != logits.shape[0]:
                logits = logits[torch.tensor(last_rows)]
            # Logits are inference tensors: penalties and grammar masks edit them in place.
            with torch.inference_mode():
                self._sample_and_emit(logits, sampled)
        self.observer.on_step(
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            self.blocks.num_used,
            self.blocks.num_blocks - 1,
        )

    def _forward(self, step_rows: list[StepRow]) -> torch.Tensor:
        if self.fault_hook is not None:  # tests only: make chosen rows fail in the forward
            self.fault_hook(step_rows)
        return self.runner.step(step_rows)

    async def _forward_staged(
        self, step_rows: list[StepRow], rows: list[ScheduledRow]
    ) -> torch.Tensor:
        """:meth:`_forward` a stage at a time where the runner has stages (the compiled
        step split by ``--step-stages``), with :meth:`_between_stages` between two."""
        stages = getattr(self.runner, "step_stages", None)
        if stages is None:
            return self._forward(step_rows)
        if self.fault_hook is not None:
            self.fault_hook(step_rows)
        staged = stages(step_rows)
        while True:
            try:
                next(staged)
            except StopIteration as done:
                return done.value
            await self._between_stages(rows)

    async def _between_stages(self, in_flight: list[ScheduledRow]) -> None:
        """Between two stages of a step (fair scheduling): let the HTTP layer run, take in
        new requests, and prefill a new tenant's prompt now, in a step of its own
        (:meth:`~.scheduler.Scheduler.interject`), rather than after the step in flight.
        Cancellations and commands wait for the step's end: they could free KV blocks
        or change adapter stacks that its remaining stages still use."""
        # A few loop ticks (one is not enough: a request's headers are read in one, its
        # handler reaches the guard middleware a few later), then wait a little for a
        # request of a tenant with nothing running that is on its way (its body, say).
        await _ticks(_TICKS_BETWEEN_STAGES)
        busy = {seq.group.tenant or "" for seq in self.scheduler.running}
        await _wait_for_arrivals(lambda: bool(arrivals.pending_tenants() - busy))
        self._drain_inbox(only_adds=True)
        row = self.scheduler.interject({id(r.seq) for r in in_flight})
        if row is not None:
            self.interjections += 1
            await self._execute([row])
            await _ticks(_TICKS_BETWEEN_STEPS)  # its first token goes out now

    def _isolate_fault(
        self, rows: list[ScheduledRow], step_rows: list[StepRow]
    ) -> tuple[list[ScheduledRow], list[StepRow], torch.Tensor]:
        """After a failed step: fail only the requests whose rows fail alone
        (:func:`~.faults.isolate_faults`); the other rows go on with their logits."""
        found = isolate_faults(self._forward, step_rows)
        bad_groups = {id(rows[i].seq.group) for i in found.failed}
        for i, exc in found.failed.items():
            group = rows[i].seq.group
            logger.error("request %s fails the forward on its own: %r", group.request_id, exc)
            self._fail(group, f"internal error during generation: {type(exc).__name__}: {exc}")
        if found.failed:
            self.faults_isolated += len(found.failed)
            self.observer.on_fault_isolated(len(found.failed))
        keep = [
            i
            for i in range(len(rows))
            if i in found.logits and id(rows[i].seq.group) not in bad_groups
        ]
        parts = [found.logits[i] for i in keep if found.logits[i].shape[0]]
        logits = torch.cat(parts) if parts else torch.empty(0, self.runner.info.vocab_size)
        return [rows[i] for i in keep], [step_rows[i] for i in keep], logits

    def _finish_scoring(self, group: RequestGroup) -> None:
        """End a ``max_new_tokens=0`` request: its prompt is scored, nothing is generated."""
        for seq in group.seqs:
            self._retire(seq, "length")
        deltas = [
            SeqDelta(
                index=s.index,
                text="",
                token_ids=[],
                finish_reason="length",
                logprobs=[] if group.params.logprobs is not None else None,
            )
            for s in group.seqs
        ]
        self._finish_group(group, "ok")
        self._push(group, deltas, finished=True)

    def _sample_and_emit(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        # A group whose prompt just finished forks its other samples from these logits.
        expanded: list[Sequence] = []
        rows: list[int] = []
        for i, seq in enumerate(seqs):
            expanded.append(seq)
            rows.append(i)
            group = seq.group
            if not group.forked and seq.index == 0 and not seq.output_ids:
                group.forked = True
                for child in group.seqs[1:]:
                    self._fork(seq, child)
                    expanded.append(child)
                    rows.append(i)
        batch_logits = logits[torch.tensor(rows)] if len(rows) != len(seqs) else logits
        # Logprobs of the model's own distribution: taken before anything edits the logits.
        asking = [i for i, s in enumerate(expanded) if s.params.logprobs is not None]
        logprobs = torch.log_softmax(batch_logits[asking].float(), dim=-1) if asking else None
        constrained = [i for i, s in enumerate(expanded) if s.matcher is not None]
        if constrained:
            try:
                grammar_mask(batch_logits, [expanded[i] for i in constrained], constrained)
            except Exception as exc:  # a grammar fault fails the constrained requests only
                logger.exception("grammar masking failed")
                for i in constrained:
                    self._fail(expanded[i].group, f"internal error in the grammar: {exc}")
        tokens = sample_rows(
            batch_logits,
            [s.params for s in expanded],
            [s.generator for s in expanded],
            [s.tokens if s.params.repetition_penalty != 1.0 else [] for s in expanded],
            [s.output_ids for s in expanded],
        )
        token_lp: dict[int, TokenLogprob] = {}
        if logprobs is not None:
            entries = token_logprobs(
                logprobs,
                [tokens[i] for i in asking],
                [expanded[i].params.logprobs or 0 for i in asking],
            )
            token_lp = dict(zip(asking, entries, strict=True))
        now = time.perf_counter()
        per_group: dict[str, list[SeqDelta]] = {}
        for i, (seq, token) in enumerate(zip(expanded, tokens)):
            group = seq.group
            if group.request_id not in self._groups:
                continue  # failed earlier in this loop
            if group.first_token_at is None:
                group.first_token_at = now
                self.observer.on_first_token(group, now - group.arrival)
            try:
                delta = seq.append_token(token, self.eos_ids, self.max_model_len)
                if delta.finish_reason is not None:
                    self._retire(seq, delta.finish_reason)
                if i in token_lp:
                    delta.logprobs = [token_lp[i]]
            except Exception as exc:  # one request's fault ends that request only
                logger.exception("request %s failed", group.request_id)
                per_group.pop(group.request_id, None)
                self._fail(group, f"internal error: {type(exc).__name__}: {exc}")
                continue
            per_group.setdefault(group.request_id, []).append(delta)
        for request_id, deltas in per_group.items():
            live = self._groups.get(request_id)
            if live is None:
                continue
            done = live.finished
            if done:
                self._finish_group(live, "ok")
            self._push(live, deltas, finished=done)

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        """Start ``child`` on the parent's prompt blocks (the last partial one copied)."""
        try:
            copy = self.block_manager.fork(parent, child)
        except MemoryError:
            # No room to fork now: the child recomputes its prompt when admitted.
            child.reset_for_recompute()
            self.scheduler.add(child)
            return
        if copy is not None:
            self.runner.copy_block(*copy)
        self.scheduler.add_running(child)

    def _retire(self, seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.release(seq)
        self.scheduler.remove(seq)

    def _push(
        self,
        group: RequestGroup,
        deltas: list[SeqDelta],
        *,
        finished: bool,
        error: str | None = None,
        error_status: int = 500,
    ) -> None:
        out = RequestOutput(
            request_id=group.request_id,
            deltas=deltas,
            prompt_tokens=len(group.prompt_ids),
            completion_tokens=group.completion_tokens(),
            finished=finished,
            error=error,
            error_status=error_status,
        )
        if finished and error is None and group.params.pooling is not None:
            out.embedding = group.embedding()
        if (
            error is None
            and not group.prompt_lp_sent
            and group.params.prompt_logprobs is not None
            and not group.wants_prompt_logits
        ):
            group.prompt_lp_sent = True
            out.prompt_logprobs = [None, *group.prompt_lp]
        group.queue.put_nowait(out)

    def _finish_group(self, group: RequestGroup, status: str) -> None:
        """Free everything the group holds; idempotent."""
        if self._groups.pop(group.request_id, None) is None:
            return
        for seq in group.seqs:
            if seq.status is not SeqStatus.FINISHED:
                self._retire(seq, "abort")
            self.scheduler.remove(seq)
        self._pending -= 1
        self.observer.on_finished(group, status, time.perf_counter() - group.arrival)

    def _fail(self, group: RequestGroup, message: str, status: int = 500) -> None:
        if group.request_id in self._groups:
            self._finish_group(group, "timeout" if status == 504 else "error")
            self._push(group, [], finished=True, error=message, error_status=status)


async def _ticks(n: int) -> None:
    """Let the event loop run ``n`` iterations (HTTP parsing, streaming)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def _wait_for_arrivals(waiting: Callable[[], bool]) -> None:
    """Yield to the loop while ``waiting()`` (requests of interest on their way to the
    engine, see :mod:`openllm_clone.arrivals`), at most ``_ARRIVAL_WAIT_S``."""
    deadline = time.perf_counter() + _ARRIVAL_WAIT_S
    while waiting() and time.perf_counter() < deadline:
        await asyncio.sleep(0.0005)
