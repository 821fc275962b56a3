"""``--compile``: the decode step compiled ahead of time (AOTInductor) gives the eager
engine's results, and a later start loads it from the compile cache.

Slow (AOTInductor compiles the tiny model's step, about a minute on 2 cores).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from openllm_clone.runners import kernels
from openllm_clone.runners.base import StepRow
from openllm_clone.runners.compiled import check_compilable

from openllm_clone.errors import ModelLoadError
from openllm_clone.llm import LLM
from openllm_clone.protocol import SamplingParams
from openllm_clone.settings import Settings
from openllm_clone.tenants import KeyEntry, current_tenant, hash_key

pytestmark = pytest.mark.slow


def make_llm(model_dir: Path | str, **overrides: Any) -> LLM:
    settings = Settings(
        **{
            "model": str(model_dir),
            "dtype": "float32",
            "device": "cpu",
            "max_batch_size": 4,
            "kv_cache_mb": 32,
            **overrides,
        }
    )
    return LLM.from_settings(settings)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, compile_cache: Path) -> Any:
    # In two stages (--step-stages): every test below runs the staged package.
    compiled = make_llm(
        tiny_model_dir, compile=True, compile_cache=str(compile_cache), step_stages=2
    )
    eager = make_llm(tiny_model_dir)
    yield compiled, eager
    compiled.shutdown()
    eager.shutdown()


def test_compiled_runner_is_built_and_warm(pair: Any, compile_cache: Path) -> None:
    compiled, eager = pair
    assert compiled.runner.compiled and not eager.runner.compiled
    assert compiled.runner._compiled.ready  # compiled at load, not on a request
    stats = compiled.metadata()["compiled"]
    assert stats["source"] == "compiled" and stats["max_rows"] == 4 and stats["stages"] == 2
    assert compiled.runner._compiled.spans == [(0, 1), (1, 2)]  # the tiny model's 2 layers
    # The tiny model's float32 weights are bf16 values: stored in bf16, exact.
    assert stats["linear"] == ("packed-bfloat16" if kernels.available() else "aten")
    package = Path(stats["package"])
    assert package.is_dir() and package.parent.parent == compile_cache
    assert list(package.rglob("*.so"))  # kept unpacked: nothing to extract at each load
    assert eager.metadata()["compiled"] is None


def test_decode_logits_match_the_eager_runner(pair: Any) -> None:
    """Same cache state, one to four decode rows (one package, a dynamic row count)."""
    compiled, eager = pair
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (7, 30, 3, 19)]
    for runner, llm in ((compiled.runner, compiled), (eager.runner, eager)):
        runner._tables = [[llm.engine.blocks.allocate() for _ in range(4)] for _ in seqs]
        runner.step([StepRow(s, 0, t) for s, t in zip(seqs, runner._tables)])
    try:
        for n in (1, 2, 3, 4):
            rows = [
                StepRow([5 + n], len(s) + n - 1, t)
                for s, t in zip(seqs[:n], compiled.runner._tables[:n])
            ]
            ours = compiled.runner.step(rows)
            assert compiled.runner._compiled.last_rows == n
            ref = eager.runner.step(
                [
                    StepRow(r.token_ids, r.start_pos, t)
                    for r, t in zip(rows, eager.runner._tables[:n])
                ]
            )
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
            # Rows past n keep their caches: step them too so positions stay in line.
            for llm in (compiled, eager):
                others = [
                    StepRow([5 + n], len(s) + n - 1, t)
                    for s, t in zip(seqs[n:], llm.runner._tables[n:])
                ]
                if others:
                    llm.runner.step(others)
    finally:
        for llm in (compiled, eager):
            for t in llm.runner._tables:
                llm.engine.blocks.free(t)


def test_prompt_chunks_run_in_the_compiled_step_with_the_eager_logits(pair: Any) -> None:
    """Prompts are rows of the graph too (one per token): whole prompts, a prompt's first
    chunk (no logits wanted) and its second chunk beside decode rows give the eager
    step's logits and write the same keys and values."""
    compiled, eager = pair
    if not compiled.runner._compiled.paged:
        pytest.skip("the packed kernels are off: prompt chunks run eagerly")
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (7, 30, 3)]
    tables = {}
    for llm in (compiled, eager):
        tables[llm] = [[llm.engine.blocks.allocate() for _ in range(4)] for _ in seqs]
    try:
        steps = compiled.runner._compiled.steps

        def both(make: Any) -> tuple[torch.Tensor, torch.Tensor]:
            ours = compiled.runner.step(make(tables[compiled]))
            return ours, eager.runner.step(make(tables[eager]))

        a, b, c = seqs
        ours, ref = both(
            lambda t: [
                StepRow(a, 0, t[0]),
                StepRow(b[:16], 0, t[1], need_logits=False),
                StepRow(c, 0, t[2]),
            ]
        )
        assert compiled.runner._compiled.last_rows == 7 + 16 + 3  # one graph row a token
        assert ours.shape == (2, ref.shape[1])
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        ours, ref = both(
            lambda t: [
                StepRow([11], 7, t[0]),
                StepRow(b[16:], 16, t[1]),
                StepRow([12], 3, t[2]),
            ]
        )
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        assert compiled.runner._compiled.steps == steps + 2
        bs = compiled.runner.block_size

        def kv(llm: LLM, table: list[int], layer: int) -> torch.Tensor:
            cache = llm.runner.kv_cache[layer]
            return torch.cat([cache[x * bs : (x + 1) * bs] for x in table])

        for i, n in enumerate((8, 30, 4)):
            for layer in (0, -1):
                ours_kv = kv(compiled, tables[compiled][i], layer)[:n]
                ref_kv = kv(eager, tables[eager][i], layer)[:n]
                torch.testing.assert_close(ours_kv, ref_kv, atol=1e-4, rtol=1e-4)
    finally:
        for llm in (compiled, eager):
            for t in tables[llm]:
                llm.engine.blocks.free(t)


async def test_greedy_outputs_equal_the_eager_engine(pair: Any) -> None:
    """Six concurrent requests (prompts joining running batches: split steps) and alone."""
    compiled, eager = pair
    params = SamplingParams(max_new_tokens=20)
    texts = [f"Tell me about item {i}. " * (1 + i % 3) for i in range(6)]
    ids = [compiled.tokenize(t) for t in texts]
    ref = [(await eager.complete(i, params)).token_ids[0] for i in ids]
    steps = compiled.runner._compiled.steps
    together = await asyncio.gather(*(compiled.complete(i, params) for i in ids))
    assert [c.token_ids[0] for c in together] == ref
    assert compiled.runner._compiled.steps >= steps + 19  # the decode steps ran compiled
    alone = (await compiled.complete(ids[0], params)).token_ids[0]
    assert alone == ref[0]
    assert compiled.engine.stats()["kv_blocks_used"] == 0


async def test_embedding_rows_beside_compiled_decode_rows(pair: Any) -> None:
    """Embedding requests join a batch that decodes compiled: their rows run eagerly (the
    graph gives no hidden states) and equal the eager engine's, the other rows go on
    compiled with the same tokens."""
    compiled, eager = pair
    params = SamplingParams(max_new_tokens=16)
    ids = [compiled.tokenize(t) for t in ("Once upon a time", "The weather today is fine")]
    want_tokens = (await eager.complete(ids[0], params)).token_ids[0]
    want = [await eager.embed(i, pooling="mean", normalize=False) for i in ids]
    steps = compiled.runner._compiled.steps

    async def embeddings_later() -> list[list[float]]:
        await asyncio.sleep(0.05)  # while the generation decodes
        return list(
            await asyncio.gather(*(compiled.embed(i, pooling="mean", normalize=False) for i in ids))
        )

    generated, got = await asyncio.gather(compiled.complete(ids[0], params), embeddings_later())
    assert generated.token_ids[0] == want_tokens
    assert compiled.runner._compiled.steps >= steps + 10  # decode rows stayed compiled
    for vector, ref in zip(got, want, strict=True):
        assert torch.allclose(torch.tensor(vector), torch.tensor(ref), atol=1e-5, rtol=0)


async def test_adapter_rows_run_in_the_compiled_step(
    pair: Any, tiny_adapters: dict[str, Path]
) -> None:
    compiled, eager = pair
    for llm in pair:
        await llm.adapters.load("alpha", str(tiny_adapters["alpha"]))
    params = SamplingParams(max_new_tokens=12)
    ids = compiled.tokenize("An adapter in a compiled engine")
    ref = await asyncio.gather(
        eager.complete(ids, params, adapter="alpha"), eager.complete(ids, params)
    )
    steps = compiled.runner._compiled.steps
    ours = await asyncio.gather(
        compiled.complete(ids, params, adapter="alpha"), compiled.complete(ids, params)
    )
    assert [c.token_ids[0] for c in ours] == [c.token_ids[0] for c in ref]
    assert ours[0].token_ids[0] != ours[1].token_ids[0]
    assert compiled.runner._compiled.steps >= steps + 11  # one row with, one without


async def _compiled_rows_equal_merged(
    compiled: LLM,
    model_dir: Path,
    paths: dict[str, Path],
    which: list[str | None],
    prompt: str,
) -> None:
    """Load ``paths``, then one request per entry of ``which`` (an adapter or none) at
    once, prompt ``prompt`` formatted with its index: each one's 10 greedy tokens equal
    transformers' generate on peft's merge_and_unload of its adapter, and their decode
    rows ran in compiled steps."""
    from tests.families import reference_greedy

    for name, path in paths.items():
        await compiled.adapters.load(name, str(path))
    ids = [compiled.tokenize(prompt.format(i)) for i in range(len(which))]
    want = [
        reference_greedy(model_dir, [x], 10, adapter=paths[name] if name else None)[0]
        for x, name in zip(ids, which)
    ]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    steps = compiled.runner._compiled.steps
    got = await asyncio.gather(
        *(compiled.complete(x, params, adapter=name) for x, name in zip(ids, which))
    )
    assert [c.token_ids[0] for c in got] == want
    assert compiled.runner._compiled.steps >= steps + 9


async def test_mixed_adapter_rows_in_the_compiled_step_equal_merge_and_unload(
    pair: Any, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    """Four requests at once, three adapters of other ranks and targets (all projections
    rank 8, q/v rank 16, MLP rank 8) and none: their decode rows share compiled steps,
    and each one's greedy tokens equal transformers' generate on peft's merge_and_unload
    of its adapter."""
    paths = {f"m-{name}": tiny_adapters[name] for name in ("alpha", "gamma", "delta")}
    which = ["m-alpha", "m-gamma", None, "m-delta"]
    await _compiled_rows_equal_merged(
        pair[0], tiny_model_dir, paths, which, "Mixed adapters, request number {}."
    )


async def test_dora_and_saved_module_rows_beside_compiled_rows_equal_merge_and_unload(
    pair: Any,
    tiny_model_dir: Path,
    tiny_adapters: dict[str, Path],
    trained_adapters: dict[str, Path],
) -> None:
    """DoRA rows run in the compiled step (its BGMV kernel rescales them per output);
    rows of an adapter with its own head and embeddings (modules_to_save) run eagerly
    beside them; with LoRA and base rows in the same steps, each one's greedy tokens
    equal transformers' generate on peft's merge_and_unload of its adapter."""
    paths = {
        "c-dora": trained_adapters["dora"],
        "c-saved": trained_adapters["saved"],
        "c-alpha": tiny_adapters["alpha"],
    }
    which = ["c-dora", "c-saved", None, "c-alpha", "c-dora"]
    await _compiled_rows_equal_merged(
        pair[0], tiny_model_dir, paths, which, "Trained adapters, request {}."
    )


async def test_a_later_start_loads_the_compiled_step_from_the_cache(
    pair: Any, tiny_model_dir: Path, compile_cache: Path
) -> None:
    """The same model, dtype and limits: the package is loaded, not compiled, and computes
    what the first one did; a broken package is compiled again; another model (its own
    weights are constants of its package) gets a package of its own."""
    compiled, _ = pair
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ids = compiled.tokenize("Once upon a time")
    want = (await compiled.complete(ids, params)).token_ids[0]
    package = Path(compiled.metadata()["compiled"]["package"])

    again = make_llm(tiny_model_dir, compile=True, compile_cache=str(compile_cache), step_stages=2)
    try:
        stats = again.metadata()["compiled"]
        assert stats["source"] == "disk" and stats["package"] == str(package)
        steps = stats["steps"]
        assert (await again.complete(ids, params)).token_ids[0] == want
        assert again.metadata()["compiled"]["steps"] >= steps + 11
    finally:
        again.shutdown()

    other_dir = tiny_model_dir.parent / "tiny-llama-other"
    if not other_dir.exists():
        import shutil

        shutil.copytree(tiny_model_dir, other_dir)
        cfg = other_dir / "config.json"
        cfg.write_text(cfg.read_text().replace("}", ', "openllm_clone_test": 1}', 1))
    for so in package.rglob("*.so"):  # and the first model's package breaks (its
        so.unlink()  # library is gone; the server that mapped it keeps running)
    for folder, source in ((other_dir, "compiled"), (tiny_model_dir, "compiled")):
        llm = make_llm(folder, compile=True, compile_cache=str(compile_cache), step_stages=2)
        try:
            stats = llm.metadata()["compiled"]
            assert stats["source"] == source
            if folder == other_dir:
                assert stats["package"] != str(package)
            else:
                assert stats["package"] == str(package)
                assert (await llm.complete(ids, params)).token_ids[0] == want
        finally:
            llm.shutdown()


async def test_a_new_tenant_is_prefilled_between_two_stages_of_a_step(
    pair: Any, tiny_model_dir: Path, compile_cache: Path
) -> None:
    """Fair scheduling with the step in two stages: tenant b's request, arriving while a
    step of tenant a's is in flight, is prefilled between the step's two stages, in a step
    of its own; both get the tokens they get alone (greedy, float32)."""
    compiled, _ = pair
    if not compiled.runner._compiled.paged:
        pytest.skip("prompt rows run compiled only with the C++ kernels")
    fair = make_llm(
        tiny_model_dir,
        compile=True,
        compile_cache=str(compile_cache),
        step_stages=2,
        scheduling="fair",
    )
    try:
        assert fair.metadata()["compiled"]["source"] == "disk"  # stages are in the key
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        a_ids = fair.tokenize("Tenant a writes a long story about")
        b_ids = fair.tokenize("Tenant b asks one question")
        want_a = (await compiled.complete(a_ids, params)).token_ids[0]
        want_b = (await compiled.complete(b_ids, params)).token_ids[0]

        async def as_tenant(name: str, ids: list[int]) -> list[int]:
            current_tenant.set(KeyEntry(tenant=name, key_id=name * 4, key_hash=hash_key(name)))
            return (await fair.complete(ids, params)).token_ids[0]

        engine, tasks = fair.engine, []

        def hook(rows: list[StepRow]) -> None:
            # a's third step: b's request is sent now and reaches the engine in the loop
            # ticks between this step's stages.
            if engine.steps == steps + 2 and not tasks:
                tasks.append(asyncio.get_running_loop().create_task(as_tenant("b", b_ids)))

        steps, before = engine.steps, engine.interjections
        engine.fault_hook = hook
        got_a = await as_tenant("a", a_ids)
        got_b = await tasks[0]
        assert (got_a, got_b) == (want_a, want_b)
        assert engine.interjections == before + 1
        assert engine.stats()["kv_blocks_used"] == 0
    finally:
        fair.shutdown()


def test_clear_errors_where_compile_cannot_run(tiny_model_dir: Path, monkeypatch: Any) -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ModelLoadError, match="CPU only"):
        check_compilable(model, torch.device("cuda"), torch.bfloat16, None)
    with pytest.raises(ModelLoadError, match="unquantized"):
        check_compilable(model, torch.device("cpu"), torch.bfloat16, "nf4")
    with pytest.raises(ModelLoadError, match="float16"):
        check_compilable(model, torch.device("cpu"), torch.float16, None)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ModelLoadError, match="C\\+\\+ compiler"):
        check_compilable(model, torch.device("cpu"), torch.bfloat16, None)
    with pytest.raises(ModelLoadError, match="C\\+\\+ compiler"):
        make_llm(tiny_model_dir, compile=True)
    # The default (auto) serves eagerly where the compiled step cannot run.
    llm = make_llm(tiny_model_dir, compile="auto")
    try:
        assert llm.runner.compile_mode == "off" and llm.metadata()["compiled"] is None
    finally:
        llm.shutdown()


async def test_auto_serves_eagerly_then_switches_to_the_step_built_in_the_background(
    pair: Any, tiny_model_dir: Path, compile_cache: Path
) -> None:
    """--compile auto (the default) with no package for this key (3 rows): the server is
    ready at once and answers eagerly while a child process compiles; the next step after
    the child is done is picked up by the idle engine, and the next request runs compiled,
    with the same tokens; a later start loads it."""
    _, eager = pair
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ids = eager.tokenize("Once upon a time")
    want = (await eager.complete(ids, params)).token_ids[0]
    llm = make_llm(
        tiny_model_dir, compile="auto", compile_cache=str(compile_cache), max_batch_size=3
    )
    try:
        stats = llm.metadata()["compiled"]
        assert (stats["mode"], stats["state"], stats["steps"]) == ("auto", "compiling", 0)
        background = llm.runner._background
        assert (await llm.complete(ids, params)).token_ids[0] == want  # eager meanwhile
        assert background.proc.wait(timeout=900) == 0, background.tail()
        # No request comes: the idle engine picks the package up (within a second here),
        # so /v1/metadata says ready without waiting for one.
        for _ in range(240):
            if llm.metadata()["compiled"]["state"] == "ready":
                break
            await asyncio.sleep(0.5)
        assert llm.metadata()["compiled"]["state"] == "ready"
        assert llm.runner._background is None
        assert (await llm.complete(ids, params)).token_ids[0] == want
        stats = llm.metadata()["compiled"]
        assert stats["state"] == "ready" and stats["steps"] >= 11
        assert llm.runner.packed  # adapter rows and prompts keep the packed eager layers
    finally:
        llm.shutdown()
    again = make_llm(
        tiny_model_dir, compile="auto", compile_cache=str(compile_cache), max_batch_size=3
    )
    try:
        stats = again.metadata()["compiled"]
        assert (stats["state"], stats["source"]) == ("ready", "disk")
        assert again.runner._background is None
        assert (await again.complete(ids, params)).token_ids[0] == want
    finally:
        again.shutdown()


async def test_auto_stays_eager_when_the_background_compile_fails_and_stops_with_the_server(
    pair: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    _, eager = pair
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    ids = eager.tokenize("Hello there")
    want = (await eager.complete(ids, params)).token_ids[0]
    # The child loads the model from its folder: gone by then, it fails.
    folder = shutil.copytree(tiny_model_dir, tmp_path / "doomed")
    llm = make_llm(folder, compile="auto", compile_cache=str(tmp_path / "cache"))
    try:
        shutil.rmtree(folder)
        background = llm.runner._background
        assert background.proc.wait(timeout=300) != 0
        assert (await llm.complete(ids, params)).token_ids[0] == want
        stats = llm.metadata()["compiled"]
        assert stats["state"] == "failed" and "exited with status" in stats["error"]
        assert not llm.runner.compiled
    finally:
        llm.shutdown()
    # Shutting down stops a compile still running.
    llm = make_llm(tiny_model_dir, compile="auto", compile_cache=str(tmp_path / "cache"))
    background = llm.runner._background
    assert background is not None and background.poll() is None
    llm.shutdown()
    assert background.poll() is not None


def _as_gguf(folder: Path) -> None:
    """Rewrite a model's weights as a GGUF Q4_1 checkpoint converted to float32 has them:
    every projection's values Q4_1 blocks, the output head's Q8_0 (as SmolLM2's)."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import gguf_values

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.copy_(gguf_values(param, "q4_1"))
        model.lm_head.weight.copy_(gguf_values(model.lm_head.weight, "q8_0"))
    model.save_pretrained(str(folder))


def test_a_bfloat16_model_runs_compiled_within_bf16_rounding(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """--dtype bfloat16: the compiled step keeps the weights in bfloat16 and its decode
    logits for eight rows agree with the eager bf16 step's within bf16 rounding (the two
    round activations at other places, so not bit for bit)."""
    from tests.helpers import closeness

    compiled = make_llm(
        tiny_model_dir,
        dtype="bfloat16",
        compile=True,
        compile_cache=str(tmp_path),
        max_batch_size=8,
    )
    eager = make_llm(tiny_model_dir, dtype="bfloat16", max_batch_size=8)
    try:
        stats = compiled.metadata()["compiled"]
        assert stats["linear"] == ("packed-bfloat16" if kernels.available() else "aten")
        gen = torch.Generator().manual_seed(3)
        seqs = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in range(3, 27, 3)]
        logits = []
        for llm in (compiled, eager):
            tables = [[llm.engine.blocks.allocate() for _ in range(2)] for _ in seqs]
            try:
                llm.runner.step([StepRow(s, 0, t) for s, t in zip(seqs, tables)])
                logits.append(
                    llm.runner.step([StepRow([7], len(s), t) for s, t in zip(seqs, tables)])
                )
            finally:
                for t in tables:
                    llm.engine.blocks.free(t)
        assert compiled.runner._compiled.last_rows == len(seqs)  # the decode ran compiled
        cosine, top1 = closeness(logits[0], logits[1])
        assert cosine >= 0.99 and top1 >= 0.75, (cosine, top1)
    finally:
        compiled.shutdown()
        eager.shutdown()


@pytest.mark.parametrize(
    ("family", "weights", "linear"),
    [("qwen3", "random", "packed-float32"), ("gemma3_text", "gguf", "packed-q4_1+q8_0")],
)
def test_compiled_step_on_qwen3_and_gemma3_equals_generate(
    family: str, weights: str, linear: str, tokenizer: Any, tmp_path: Path
) -> None:
    """--compile on the fast runner's other families: Qwen3's per-head q/k norms; Gemma 3's
    (1 + w) norms, four a layer, and its local layers (own rotary tables, a sliding window
    shorter than these prompts). fp32 greedy tokens equal transformers' generate, three
    requests at once (decode rows in the graph beside eager prompt chunks) and alone.
    Random float32 weights are packed in float32; GGUF-valued ones keep their blocks."""
    from tests.families import make_family_model, reference_greedy

    folder = make_family_model(family, tmp_path / family, tokenizer)
    if weights == "gguf":
        _as_gguf(folder)
    llm = LLM.from_settings(
        Settings(model=str(folder), dtype="float32", kv_cache_mb=16, compile=True, max_batch_size=4)
    )
    try:
        llm.runner.warmup()
        assert llm.runner.tier == "fast" and llm.runner.compiled
        assert llm.metadata()["compiled"]["linear"] == (linear if kernels.available() else "aten")
        texts = ["The quick brown fox jumps over the lazy dog", "Once upon a time", "Hello"]
        ids = [llm.tokenize(t) for t in texts]
        want = reference_greedy(folder, ids, 12)
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)

        async def run() -> tuple[list[list[int]], list[int]]:
            together = await asyncio.gather(*(llm.complete(x, params) for x in ids))
            alone = await llm.complete(ids[0], params)
            return [c.token_ids[0] for c in together], alone.token_ids[0]

        together, alone = asyncio.run(run())
        assert together == want and alone == want[0]
        assert llm.metadata()["compiled"]["steps"] >= 2 * 11  # decode steps ran compiled
    finally:
        llm.shutdown()


def test_import_compiles_ahead_for_start(
    tiny_model_dir: Path, trained_adapters: dict[str, Path], tmp_path: Path, monkeypatch: Any
) -> None:
    """`import --compile` leaves the package where `start --compile` of the stored model
    (same dtype and limits) finds it: the start loads it instead of compiling. With the
    packed kernel off (what a CPU without AVX2 gets) the graph runs F.linear."""
    from openllm_clone.cli import app
    from typer.testing import CliRunner

    monkeypatch.setenv("OPENLLM_CLONE_PACKED_LINEAR", "0")

    cache = tmp_path / "compiled"
    result = CliRunner().invoke(
        app,
        [
            "import",
            str(tiny_model_dir),
            "--name",
            "tiny-ahead",
            "--compile",
            "--dtype",
            "float32",
            "--max-batch-size",
            "4",
            "--compile-cache",
            str(cache),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "decode step compiled" in result.output
    tag = result.output.strip().splitlines()[-1]
    llm = make_llm(tag, compile=True, compile_cache=str(cache))
    try:
        stats = llm.metadata()["compiled"]
        assert stats["source"] == "disk" and Path(stats["package"]).parent.parent == cache
        assert stats["linear"] == "aten"
        assert not llm.runner._compiled.paged  # decode rows only: prompts run eagerly
        ids = llm.tokenize("Once upon a time")
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        eager = make_llm(tiny_model_dir)
        try:
            want = asyncio.run(eager.complete(ids, params)).token_ids[0]
            # A DoRA row through the gathered (kernel-less) graph: its rescale too.
            for x in (llm, eager):
                asyncio.run(x.adapters.load("dora", str(trained_adapters["dora"])))
            dora = [
                asyncio.run(x.complete(ids, params, adapter="dora")).token_ids[0]
                for x in (llm, eager)
            ]
            assert dora[0] == dora[1] != want
            # A step with a decode row and a prompt: the row through the graph, the prompt
            # eagerly, the logits back in row order (and none for a chunk that wants none).
            tables = {
                x: [[x.engine.blocks.allocate() for _ in range(2)] for _ in range(3)]
                for x in (llm, eager)
            }
            try:
                for x in (llm, eager):
                    x.runner.step([StepRow(list(range(3, 10)), 0, tables[x][0])])
                got, ref = (
                    x.runner.step(
                        [
                            StepRow(list(range(20, 25)), 0, tables[x][1]),
                            StepRow([11], 7, tables[x][0]),
                            StepRow(list(range(30, 34)), 0, tables[x][2], need_logits=False),
                        ]
                    )
                    for x in (llm, eager)
                )
                assert llm.runner._compiled.last_rows == 1 and got.shape == ref.shape == (
                    2,
                    ref.shape[1],
                )
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
            finally:
                for x in (llm, eager):
                    for t in tables[x]:
                        x.engine.blocks.free(t)
        finally:
            eager.shutdown()
        assert asyncio.run(llm.complete(ids, params)).token_ids[0] == want
    finally:
        llm.shutdown()


def test_compile_cache_folder_and_key(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`none` turns the cache off; the default lies under BENTOML_HOME; the key follows
    what the package bakes in (dtype, limits, the model's files), not how the model is
    named."""
    import os

    from openllm_clone.runners.loader import compile_cache_dir

    def folder(**kw: Any) -> Path | None:
        settings = Settings(model=str(tiny_model_dir), compile=True, **kw)
        return compile_cache_dir(settings, tiny_model_dir, torch.float32)

    assert folder(compile_cache="none") is None
    default = folder()
    assert default is not None
    assert default.parent == Path(os.environ["BENTOML_HOME"]) / "openllm-clone" / "compiled"
    mine = folder(compile_cache=str(tmp_path))
    assert mine is not None and mine.parent == tmp_path and mine.name == default.name
    assert folder(compile_cache=str(tmp_path), max_batch_size=8) != mine
    assert folder(compile_cache=str(tmp_path), max_model_len=64) != mine
    assert folder(compile_cache=str(tmp_path), model_name="other") == mine
    settings = Settings(model=str(tiny_model_dir), compile=True, compile_cache=str(tmp_path))
    assert compile_cache_dir(settings, tiny_model_dir, torch.bfloat16) != mine


def test_prune_cache_and_partials_left_by_killed_compiles(tmp_path: Path) -> None:
    """Packages unused for 14 days go (unless their lock is held); a compile killed
    midway leaves decode.partial-<pid>, removed once that process is gone."""
    import fcntl
    import os
    import time

    from openllm_clone.runners.compiled import _remove_partials, prune_cache

    old, fresh, busy, foreign = (tmp_path / n for n in ("m-old", "m-new", "m-busy", "other"))
    for folder in (old, fresh, busy, foreign):
        (folder / "decode").mkdir(parents=True)
    for folder in (old, fresh, busy):
        (folder / ".last-used").touch()
    month_ago = time.time() - 30 * 86400
    for folder in (old, busy):
        os.utime(folder / ".last-used", (month_ago, month_ago))
    with open(busy / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a server using it
        assert prune_cache(tmp_path, keep=fresh) == [old]
    assert not old.exists() and fresh.exists() and busy.exists()
    assert foreign.exists()  # not a folder the compiled step made: never touched

    dead = fresh / "decode.partial-999999999"
    alive = fresh / f"decode.partial-{os.getpid()}"
    for p in (dead, alive):
        p.mkdir()
    _remove_partials(fresh)
    assert not dead.exists() and alive.exists()
