"""The scheduler and the block manager alone: no torch, no model, no runner (plain token
ids; the detokenizer is never reached). Admission under the batch, prefill and KV-block
budgets, preemption order, prefix matching (per adapter), and n > 1 forks."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from openllm_clone.engine.block_manager import BlockManager
from openllm_clone.engine.kv_cache import BlockAllocator
from openllm_clone.engine.scheduler import Scheduler
from openllm_clone.engine.sequence import AdapterRef, RequestGroup, SeqStatus, Sequence
from openllm_clone.protocol import SamplingParams

BS = 4  # tokens per block


def seq(prompt: list[int], *, adapter: AdapterRef | None = None, n: int = 1) -> Sequence:
    group = RequestGroup(
        request_id=f"r{id(prompt)}",
        prompt_ids=prompt,
        params=SamplingParams(max_new_tokens=8, n=n),
        adapter=adapter,
        queue=asyncio.Queue(),
    )
    s = Sequence(group, 0, tokenizer=None, generator=None)
    group.seqs.append(s)
    return s


def make(num_blocks: int, *, batch: int = 8, prefill: int = 64) -> tuple[Scheduler, BlockManager]:
    blocks = BlockManager(BlockAllocator(num_blocks, BS))
    return Scheduler(blocks, max_batch_size=batch, max_prefill_tokens=prefill), blocks


def step(sched: Scheduler, blocks: BlockManager) -> list[tuple[Sequence, int, bool]]:
    """One step as the engine runs it, without a model: the rows' tokens become cached and
    every finished prompt or decode row gets one new token."""
    rows = sched.schedule()
    for r in rows:
        r.seq.num_cached += len(r.tokens)
        blocks.register(r.seq)
        if r.need_logits:
            r.seq.output_ids.append(7)
    return [(r.seq, len(r.tokens), r.need_logits) for r in rows]


def test_imports_no_torch() -> None:
    code = (
        "import sys; import openllm_clone.engine.scheduler, openllm_clone.engine.block_manager; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_admission_respects_the_batch_and_the_prefill_budget() -> None:
    sched, blocks = make(64, batch=2, prefill=8)
    a, b, c = seq(list(range(5))), seq(list(range(10, 15))), seq(list(range(20, 25)))
    for s in (a, b, c):
        sched.add(s)
    # a whole, b's first 3 tokens (the budget), c waits: the batch holds two.
    assert step(sched, blocks) == [(a, 5, True), (b, 3, False)]
    assert list(sched.waiting) == [c] and c.status is SeqStatus.WAITING
    # Next: a decodes one token, b finishes its prompt; c still waits.
    assert step(sched, blocks) == [(a, 1, True), (b, 2, True)]
    sched.remove(a)  # a finished
    blocks.release(a)
    rows = step(sched, blocks)
    assert (c, 5, True) in rows and (b, 1, True) in rows


def test_admission_keeps_a_block_per_running_sequence() -> None:
    sched, blocks = make(5)  # 4 usable blocks
    a = seq(list(range(12)))  # 3 blocks
    b = seq(list(range(100, 104)))  # 1 block: would leave none for a's next token
    sched.add(a)
    sched.add(b)
    assert step(sched, blocks) == [(a, 12, True)]
    assert list(sched.waiting) == [b]


def test_the_newest_running_sequence_is_preempted_first() -> None:
    sched, blocks = make(5, prefill=64)  # 4 usable blocks
    old, new = seq(list(range(7))), seq(list(range(50, 53)))
    sched.add(old)
    sched.add(new)
    step(sched, blocks)  # old: 2 blocks, new: 1
    assert blocks.num_free == 1
    # Both grow; old (scheduled first) takes the last free block, new stalls; when old
    # needs one more, new (the newest, not yet in that step) is preempted for it.
    for _ in range(10):
        step(sched, blocks)
        if new.status is SeqStatus.WAITING:
            break
    assert new.status is SeqStatus.WAITING and new.block_table == [] and new.num_cached == 0
    assert sched.waiting[0] is new and sched.running == [old] and len(old.block_table) == 4
    assert old.num_cached == old.num_tokens - 1  # old kept computing


def test_prefix_matching_reuses_full_blocks_of_the_same_adapter_only() -> None:
    sched, blocks = make(32)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    first = seq(prompt)
    sched.add(first)
    step(sched, blocks)
    again, other_adapter = seq(list(prompt)), seq(list(prompt), adapter=AdapterRef("a", 1, 1))
    assert blocks.match_prefix(again) == 2 and again.num_cached == 8
    assert again.block_table == first.block_table[:2]
    assert blocks.match_prefix(other_adapter) == 0
    # Blocks computed under one load of an adapter serve later requests of that load only,
    # not a later occupant of the same slot (a reload, or another adapter).
    sched.add(other_adapter)
    step(sched, blocks)
    same_load = seq(list(prompt), adapter=AdapterRef("a", 1, 1))
    assert blocks.match_prefix(same_load) == 2
    reloaded = seq(list(prompt), adapter=AdapterRef("a", 1, 2))
    assert blocks.match_prefix(reloaded) == 0
    # The block of the last known token is never taken: its logits are needed.
    exact = seq(list(range(8)))
    assert blocks.match_prefix(exact) == 1
    # A request that asks for its prompt's logprobs takes nothing.
    scoring = seq(list(prompt))
    scoring.group.params = SamplingParams(max_new_tokens=1, prompt_logprobs=0)
    assert blocks.match_prefix(scoring) == 0


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    alloc = BlockAllocator(5, BS)
    blocks = BlockManager(alloc)
    parent = seq(list(range(6)), n=2)  # one full block and a partial one
    blocks.grow(parent, 6)
    parent.num_cached = 6
    child = Sequence(parent.group, 1, tokenizer=None, generator=None)
    copy = blocks.fork(parent, child)
    assert (
        child.block_table[0] == parent.block_table[0] and alloc.refcount(parent.block_table[0]) == 2
    )
    assert copy == (parent.block_table[1], child.block_table[1]) and child.num_cached == 6
    # No block left for the copy: MemoryError, and the child holds nothing.
    alloc.allocate()
    late = Sequence(parent.group, 2, tokenizer=None, generator=None)
    with pytest.raises(MemoryError):
        blocks.fork(parent, late)
    assert late.block_table == [] and alloc.refcount(parent.block_table[0]) == 3 - 1


def tenant_seq(tenant: str, prompt: list[int], weight: float = 1.0) -> Sequence:
    s = seq(prompt)
    s.group.tenant = tenant
    s.group.weight = weight
    return s


def admitted_order(sched: Scheduler, blocks: BlockManager, steps: int) -> list[str]:
    """Tenants in the order their sequences were admitted; each runs one decode step
    after its prompt and finishes (the batch has room for one at a time)."""
    order: list[str] = []
    for _ in range(steps):
        for s, _, _ in step(sched, blocks):
            if s.group.tenant and len(s.output_ids) == 1:
                order.append(s.group.tenant)
                sched.remove(s)
                blocks.release(s)
    return order


def test_fifo_serves_a_flood_before_a_late_tenant() -> None:
    sched, blocks = make(64, batch=1)
    for i in range(6):
        sched.add(tenant_seq("a", [i, i + 1, i + 2]))
    sched.add(tenant_seq("b", [9, 9, 9]))
    assert admitted_order(sched, blocks, 7) == ["a"] * 6 + ["b"]


def test_fair_admits_the_late_tenant_next() -> None:
    """Tenant a's six queued requests do not hold back b's one: once a has been served a
    request's worth, b goes next (the virtual token counters)."""
    blocks = BlockManager(BlockAllocator(64, BS))
    sched = Scheduler(blocks, max_batch_size=1, max_prefill_tokens=64, fair=True)
    for i in range(6):
        sched.add(tenant_seq("a", [i, i + 1, i + 2]))
    sched.add(tenant_seq("b", [9, 9, 9]))
    order = admitted_order(sched, blocks, 7)
    assert order.index("b") == 1 and order.count("a") == 6
    assert sched.counters["a"] > sched.counters["b"] > 0


def test_fair_shares_follow_weights_and_idle_time_banks_nothing() -> None:
    blocks = BlockManager(BlockAllocator(256, BS))
    sched = Scheduler(blocks, max_batch_size=1, max_prefill_tokens=64, fair=True)
    for i in range(12):
        sched.add(tenant_seq("heavy", [i, 1, 2], weight=2.0))
        sched.add(tenant_seq("light", [i, 3, 4], weight=1.0))
    order = admitted_order(sched, blocks, 18)
    first = order[:12]
    # weight 2 gets about twice the service of weight 1 while both have work
    assert first.count("heavy") >= 7 and first.count("light") >= 3, order
    # A newcomer starts at the lowest active counter, not at zero: no banked credit.
    late = tenant_seq("late", [5, 5, 5])
    sched.add(late)
    active = [sched.counters[t] for t in ("heavy", "light")]
    assert sched.counters["late"] == pytest.approx(min(active))


def test_fair_pauses_a_tenant_over_its_share_for_a_starved_one() -> None:
    """The batch is full of a's sequences; b's one request takes the slot of a's newest at
    the next step (b is under its share of the batch). The paused sequence keeps its KV
    blocks and resumes with a one-token row when b is done: nothing is recomputed."""
    blocks = BlockManager(BlockAllocator(128, BS))
    sched = Scheduler(blocks, max_batch_size=4, max_prefill_tokens=64, fair=True)
    flood = [tenant_seq("a", [i, i, i, i, i]) for i in range(6)]
    for s in flood:
        sched.add(s)
    step(sched, blocks)
    step(sched, blocks)
    assert sorted(id(s) for s in sched.running) == sorted(id(s) for s in flood[:4])
    b = tenant_seq("b", [9, 9, 9])
    sched.add(b)
    paused = flood[3]
    cached, table = paused.num_cached, list(paused.block_table)
    rows = step(sched, blocks)
    assert (b, 3, True) in rows and paused not in [r[0] for r in rows]
    assert paused in sched.waiting and paused.status is SeqStatus.WAITING
    assert paused.block_table == table and paused.num_cached == cached  # kept
    assert len(sched.running) == 4 and sched.paused == 1
    # One each is within both shares (2 of 4 each is b's share; a holds 3): no thrashing.
    step(sched, blocks)
    assert b in sched.running and sched.paused == 1
    sched.remove(b)
    blocks.release(b)
    rows = step(sched, blocks)
    assert (paused, 1, True) in rows  # resumes where it stopped


def test_fair_prefills_a_new_tenant_alone() -> None:
    """While a's sequences decode, b's new request is prefilled in a step of its own
    (its first token does not wait for a's rows); the next step has everyone. FIFO puts
    b's prompt beside a's rows."""
    for fair in (True, False):
        blocks = BlockManager(BlockAllocator(128, BS))
        sched = Scheduler(blocks, max_batch_size=4, max_prefill_tokens=64, fair=fair)
        a1, a2 = tenant_seq("a", [1, 1, 1]), tenant_seq("a", [2, 2, 2])
        for s in (a1, a2):
            sched.add(s)
        step(sched, blocks)
        assert step(sched, blocks) == [(a1, 1, True), (a2, 1, True)]
        b = tenant_seq("b", [9] * 5)
        sched.add(b)
        rows = step(sched, blocks)
        if fair:
            assert rows == [(b, 5, True)]
            assert step(sched, blocks) == [(a1, 1, True), (a2, 1, True), (b, 1, True)]
        else:
            assert rows == [(a1, 1, True), (a2, 1, True), (b, 5, True)]
        # b's second request, with b running: no step of its own.
        b2 = tenant_seq("b", [8] * 3)
        sched.add(b2)
        assert (b2, 3, True) in step(sched, blocks) and len(sched.running) == 4


def test_kv_pressure_takes_a_paused_sequence_blocks() -> None:
    blocks = BlockManager(BlockAllocator(16, BS))
    sched = Scheduler(blocks, max_batch_size=2, max_prefill_tokens=64, fair=True)
    a1, a2 = tenant_seq("a", [1] * 7), tenant_seq("a", [3] * 7)
    sched.add(a1)
    sched.add(a2)
    step(sched, blocks)
    b = tenant_seq("b", [2] * 3)
    sched.add(b)
    step(sched, blocks)  # a2 paused with its blocks, b runs beside a1
    assert a2.block_table and a2 in sched.waiting and b in sched.running
    # With every running sequence already in the step, the paused one gives up its blocks.
    assert sched._victim(b, {id(a1)}) is a2
    sched.preempt(a2)
    assert not a2.block_table and a2.num_cached == 0 and a2 in sched.waiting


def test_fifo_never_preempts_for_fairness() -> None:
    sched, blocks = make(128, batch=2)
    a1, a2 = tenant_seq("a", [1, 1, 1]), tenant_seq("a", [2, 2, 2])
    for s in (a1, a2):
        sched.add(s)
    step(sched, blocks)
    b = tenant_seq("b", [3, 3, 3])
    sched.add(b)
    step(sched, blocks)
    assert sched.running == [a1, a2] and list(sched.waiting) == [b]


def test_interject_prefills_a_new_tenant_beside_a_full_batch_in_flight() -> None:
    """Between two stages of a step in flight (fair mode), a new tenant's request is
    prefilled in a step of its own even with the batch full, never preempting the rows in
    flight; the next step pauses one of the tenant over its share to get back to the
    batch size. FIFO never interjects."""
    blocks = BlockManager(BlockAllocator(64, BS))
    sched = Scheduler(blocks, max_batch_size=2, max_prefill_tokens=64, fair=True)
    a1, a2, a3 = (tenant_seq("a", [t] * 5) for t in (1, 2, 3))
    for s in (a1, a2, a3):
        sched.add(s)
    in_flight = step(sched, blocks)
    assert [s for s, _, _ in in_flight] == [a1, a2]
    assert sched.interject({id(a1), id(a2)}) is None  # nobody new
    b = tenant_seq("b", [4] * 3)
    sched.add(b)
    row = sched.interject({id(a1), id(a2)})
    assert row is not None and row.seq is b and row.tokens == [4] * 3 and row.need_logits
    assert sched.running == [a1, a2, b] and a1.block_table and a2.block_table
    b.num_cached += 3
    b.output_ids.append(7)
    assert sched.interject({id(a1), id(a2)}) is None  # b runs now
    rows = step(sched, blocks)  # a2 (a's newest) paused: back to two rows
    assert rows == [(a1, 1, True), (b, 1, True)] and a2 in sched.waiting and a2.block_table

    fifo, fblocks = make(64, batch=2)
    for s in (tenant_seq("a", [1] * 5), tenant_seq("a", [2] * 5)):
        fifo.add(s)
    step(fifo, fblocks)
    fifo.add(tenant_seq("b", [4] * 3))
    assert fifo.interject(set()) is None
