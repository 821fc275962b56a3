"""Adapters: mixed batches equal merged weights, validation, LRU, pickles refused."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from openllm_clone.errors import (
    AdapterIncompatibleError,
    AdapterLoadError,
    AdapterNotFoundError,
    OpenLLMCloneError,
)
from openllm_clone.llm import LLM
from openllm_clone.protocol import SamplingParams
from openllm_clone.settings import Settings
from tests.helpers import make_adapter


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> Any:
    instance = LLM.from_settings(
        Settings(
            model=str(tiny_model_dir), dtype="float32", device="cpu", max_adapters=3, kv_cache_mb=32
        )
    )
    yield instance
    instance.shutdown()


def merged_greedy(base: Path, adapter: Path | None, ids: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("per_token_from", [8, 1], ids=["default", "per-token-forced"])
async def test_mixed_batch_rows_equal_merged_adapters(
    llm: LLM,
    tiny_model_dir: Path,
    tiny_adapters: dict[str, Path],
    per_token_from: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Decode steps with several adapters take the masked path by default (fewer than 8
    # distinct adapters here) and the per-token path when forced: both must be exact.
    from openllm_clone.runners import lora as lora_mod

    monkeypatch.setattr(lora_mod, "_PER_TOKEN_MIN_ADAPTERS", per_token_from)
    for name in ("alpha", "beta", "gamma"):
        await llm.adapters.load(name, str(tiny_adapters[name]))
    cases = [
        (None, "The weather today"),
        ("alpha", "The weather today"),
        ("beta", "A story about a cat"),
        ("gamma", "Numbers: one two"),
        (None, "A story about a cat"),
        ("alpha", "Numbers: one two"),
    ]
    params = SamplingParams(max_new_tokens=16)
    ids = [llm.tokenize(p) for _, p in cases]
    results = await asyncio.gather(
        *(llm.complete(i, params, adapter=a) for (a, _), i in zip(cases, ids))
    )
    outputs = [r.token_ids[0] for r in results]
    for (adapter, _), i, got in zip(cases, ids, outputs):
        path = tiny_adapters[adapter] if adapter else None
        assert got == merged_greedy(tiny_model_dir, path, i, 16), adapter
    # The adapters really change the output.
    assert outputs[0] != outputs[1]
    # The float32 stacks built for these batches are kept, and counted in /v1/metadata.
    assert llm.metadata()["adapter_cache"]["stack_bytes"] == llm.runner.lora.stack_bytes() > 0


@pytest.mark.parametrize("per_token_from", [8, 1], ids=["default", "per-token-forced"])
async def test_dora_and_saved_modules_in_a_mixed_batch_equal_merged(
    llm: LLM,
    tiny_model_dir: Path,
    tiny_adapters: dict[str, Path],
    trained_adapters: dict[str, Path],
    per_token_from: int,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """DoRA rows (every projection rescaled per output), rows of an adapter with its own
    head and embeddings (modules_to_save), plain LoRA rows and base rows in the same steps:
    each row's greedy tokens equal transformers on peft's merge_and_unload of its adapter
    alone, on the masked and the per-token paths."""
    from openllm_clone.runners import lora as lora_mod
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(lora_mod, "_PER_TOKEN_MIN_ADAPTERS", per_token_from)
    paths = {"dora": trained_adapters["dora"], "saved": trained_adapters["saved"]}
    paths["alpha"] = tiny_adapters["alpha"]
    for name, path in paths.items():
        await llm.adapters.load(name, str(path))
    prompts = ["The weather today", "A story about a cat", "Numbers: one two"]
    cases = [(a, p) for p in prompts for a in (None, "dora", "saved", "alpha")]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ids = [llm.tokenize(p) for _, p in cases]
    results = await asyncio.gather(
        *(llm.complete(i, params, adapter=a) for (a, _), i in zip(cases, ids))
    )
    for (adapter, prompt), i, got in zip(cases, ids, results):
        want = merged_greedy(tiny_model_dir, paths[adapter] if adapter else None, i, 12)
        assert got.token_ids[0] == want, (adapter, prompt)
    # The magnitude matters: the same A and B as plain LoRA give other tokens.
    plain = tmp_path / "dora-as-lora"
    shutil.copytree(paths["dora"], plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    tensors = load_file(str(plain / "adapter_model.safetensors"))
    kept = {k: v for k, v in tensors.items() if "magnitude" not in k}
    save_file(kept, str(plain / "adapter_model.safetensors"))
    as_lora = merged_greedy(tiny_model_dir, plain, ids[1], 12)
    assert results[1].token_ids[0] != as_lora
    kinds = {a.name: (a.kind, a.size_bytes) for a in llm.adapters.list() if a.name in paths}
    assert kinds["dora"][0] == "dora" and kinds["alpha"][0] == "lora"
    assert kinds["saved"][0] == "lora + lm_head, embed_tokens"
    vocab, hidden = llm.runner.embed.weight.shape
    assert kinds["saved"][1] > 2 * vocab * hidden * 4  # the two saved copies are counted
    assert llm.metadata()["adapter_cache"]["saved_bytes"] == 2 * vocab * hidden * 4


async def test_adapters_the_server_cannot_serve_whole_are_refused_with_the_reason(
    llm: LLM, tiny_model_dir: Path, trained_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """A saved module other than the embeddings and the head, a saved head of a resized
    vocabulary (added tokens), a merge of a DoRA adapter: each a 422 that says why."""
    from safetensors.torch import load_file, save_file

    norm = make_adapter(tiny_model_dir, tmp_path / "norm", seed=3, rank=4, save=["norm"])
    with pytest.raises(AdapterIncompatibleError, match="whole module 'model.norm'"):
        await llm.adapters.load("norm", str(norm))
    resized = tmp_path / "resized"
    shutil.copytree(trained_adapters["saved"], resized)
    tensors = load_file(str(resized / "adapter_model.safetensors"))
    for key in [k for k in tensors if k.endswith(("lm_head.weight", "embed_tokens.weight"))]:
        tensors[key] = torch.cat([tensors[key], tensors[key][:2]])
    save_file(tensors, str(resized / "adapter_model.safetensors"))
    with pytest.raises(AdapterIncompatibleError, match="added to the vocabulary"):
        await llm.adapters.load("resized", str(resized))
    await llm.adapters.load("dora", str(trained_adapters["dora"]))
    await llm.adapters.load("alpha-2", str(trained_adapters["saved"]))
    name = await llm.adapters.merged(["dora", "alpha-2"], [0.5, 0.5])
    with pytest.raises(AdapterIncompatibleError, match="merges combine plain LoRA"):
        await llm.complete(llm.tokenize("Hi"), SamplingParams(max_new_tokens=2), adapter=name)


async def test_gathered_decode_path_equals_alone(llm: LLM, tiny_adapters: dict[str, Path]) -> None:
    # Four distinct adapters in one decode batch take the gathered-bmm path.
    names = ["alpha", "beta", "gamma"]
    for name in names:
        await llm.adapters.load(name, str(tiny_adapters[name]))
    params = SamplingParams(max_new_tokens=12)
    ids = llm.tokenize("Once upon a time")
    alone = [(await llm.complete(ids, params, adapter=n)).token_ids[0] for n in names]
    together = await asyncio.gather(*(llm.complete(ids, params, adapter=n) for n in names * 2))
    assert [r.token_ids[0] for r in together] == alone * 2


async def test_validation_failures_leave_state_unchanged(
    llm: LLM, tmp_path: Path, tiny_adapters: dict[str, Path], tokenizer: Any
) -> None:
    before = [a.model_dump() for a in llm.adapters.list()]
    # Another model's adapter: shapes differ.
    from tests.helpers import make_adapter, make_tiny_model

    other = make_tiny_model(tmp_path / "other", tokenizer, hidden=128)
    wrong = make_adapter(other, tmp_path / "wrong", seed=9)
    with pytest.raises(AdapterIncompatibleError, match="base model|do not fit"):
        await llm.adapters.load("wrong", str(wrong), force=True)
    # Rank above the limit.
    llm.adapters.host.max_rank = 4
    try:
        with pytest.raises(AdapterIncompatibleError, match="rank 8 exceeds"):
            await llm.adapters.load("too-big", str(tiny_adapters["alpha"]))
    finally:
        llm.adapters.host.max_rank = 64
    # Unknown target module.
    bad = tmp_path / "bad"
    shutil.copytree(tiny_adapters["gamma"], bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad / "adapter_model.safetensors"))
    save_file(
        {k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()},
        str(bad / "adapter_model.safetensors"),
    )
    with pytest.raises(AdapterIncompatibleError, match="qkv_proj"):
        await llm.adapters.load("bad", str(bad))
    # Missing folder / no weights.
    with pytest.raises(AdapterNotFoundError):
        await llm.adapters.load("nope", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(AdapterIncompatibleError, match="no adapter_model.safetensors"):
        await llm.adapters.load("empty", str(empty))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_adapters["alpha"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterLoadError):
        await llm.adapters.load("corrupt", str(corrupt))
    assert [a.model_dump() for a in llm.adapters.list()] == before


async def test_oversized_adapter_is_refused(llm: LLM, tiny_adapters: dict[str, Path]) -> None:
    before = [a.name for a in llm.adapters.list()]
    llm.adapters.max_bytes = 1000
    try:
        with pytest.raises(AdapterIncompatibleError, match="--max-adapter-mb"):
            await llm.adapters.load("big", str(tiny_adapters["alpha"]))
    finally:
        llm.adapters.max_bytes = 2**30
    assert [a.name for a in llm.adapters.list()] == before


@pytest.mark.parametrize(
    "source", ["~no-such-user-xyz/adapter", "a" * 5000, "/" + "b" * 300 + "/x"]
)
async def test_unopenable_sources_are_404(llm: LLM, source: str) -> None:
    # Found by the fuzzer: these raised RuntimeError / OSError, answered as 500.
    with pytest.raises(AdapterNotFoundError, match="cannot be opened|does not exist"):
        await llm.adapters.load("odd", source)


async def test_pickled_adapter_is_refused(
    llm: LLM, tmp_path: Path, tiny_adapters: dict[str, Path]
) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_adapters["alpha"] / "adapter_config.json", folder)
    torch.save(
        load_file(str(tiny_adapters["alpha"] / "adapter_model.safetensors")),
        folder / "adapter_model.bin",
    )
    with pytest.raises(AdapterIncompatibleError, match="pickled"):
        await llm.adapters.load("pickled", str(folder))


async def test_lru_eviction_and_reload_on_demand(llm: LLM, tiny_adapters: dict[str, Path]) -> None:
    for name in ("alpha", "beta", "gamma"):
        await llm.adapters.load(name, str(tiny_adapters[name]))
    ids = llm.tokenize("Hello")
    params = SamplingParams(max_new_tokens=6)
    want = (await llm.complete(ids, params, adapter="alpha")).token_ids
    await llm.adapters.load("delta", str(tiny_adapters["delta"]))  # 4th: evicts the LRU (beta)
    states = {a.name: a.state for a in llm.adapters.list()}
    assert states["delta"] == "ready" and states["beta"] == "registered"
    # beta's source is known: a request for it loads it again just in time.
    again = await llm.complete(ids, params, adapter="beta")
    assert {a.name: a.state for a in llm.adapters.list()}["beta"] == "ready"
    assert again.token_ids[0]
    assert (await llm.complete(ids, params, adapter="alpha")).token_ids == want
    with pytest.raises(AdapterNotFoundError):
        await llm.complete(ids, params, adapter="never-heard-of")


async def test_unload_waits_for_in_flight(llm: LLM, tiny_adapters: dict[str, Path]) -> None:
    await llm.adapters.load("alpha", str(tiny_adapters["alpha"]))
    ids = llm.tokenize("Long story")
    running = asyncio.create_task(
        llm.complete(ids, SamplingParams(max_new_tokens=60), adapter="alpha")
    )
    await asyncio.sleep(0.05)
    await llm.adapters.unload("alpha")
    result = await running
    assert result.finish_reasons == ["length"]
    assert "alpha" not in llm.adapters.names()


async def test_linear_merge_equals_peft_weighted_cat(
    llm: LLM, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    await llm.adapters.load("alpha", str(tiny_adapters["alpha"]))
    await llm.adapters.load("gamma", str(tiny_adapters["gamma"]))
    name = await llm.adapters.merged(["alpha", "gamma"], [0.7, 0.3])
    assert name == "merge:alpha*0.7+gamma*0.3"
    ids = llm.tokenize("The weather today")
    ours = await llm.complete(ids, SamplingParams(max_new_tokens=16), adapter=name)
    merged = {a.name: a for a in llm.adapters.list()}[name]
    assert merged.rank == 8 + 16 and merged.kind == "merge (linear)"

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(tiny_adapters["alpha"]), adapter_name="alpha")
    peft_model.load_adapter(str(tiny_adapters["gamma"]), adapter_name="gamma")
    peft_model.add_weighted_adapter(["alpha", "gamma"], [0.7, 0.3], "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    merged = peft_model.merge_and_unload()
    ref = merged.generate(
        torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert ours.token_ids[0] == ref[0, len(ids) :].tolist()
    # The same recipe reuses the cached merge; an unknown component is a 404.
    assert await llm.adapters.merged(["alpha", "gamma"], [0.7, 0.3]) == name
    with pytest.raises(AdapterNotFoundError):
        await llm.adapters.merged(["alpha", "nobody"], [0.5, 0.5])


@pytest.mark.parametrize(
    ("strategy", "sign"),
    [
        ("ties", "total"),
        ("dare_linear", None),
        ("dare_ties", "frequency"),
        ("magnitude_prune", None),
    ],
)
async def test_ties_and_dare_merges_equal_peft_add_weighted_adapter(
    llm: LLM,
    tiny_model_dir: Path,
    tiny_adapters: dict[str, Path],
    strategy: str,
    sign: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """peft's own combination, token for token: alpha (every projection) and delta (the MLP
    only; both rank 8) merged at density 0.5. DARE prunes at random: peft's merge is seeded
    as ours is (after it has initialised the new adapter's layers, which draws numbers)."""
    from openllm_clone.adapters.merge import MERGE_SEED
    from peft import PeftModel
    from peft.tuners.lora.model import LoraModel
    from transformers import AutoModelForCausalLM

    for name in ("alpha", "delta"):
        await llm.adapters.load(name, str(tiny_adapters[name]))
    name = await llm.adapters.merged(
        ["alpha", "delta"], [0.7, -0.4], strategy=strategy, density=0.5, majority_sign_method=sign
    )
    assert name == f"merge:{strategy}(0.5,{sign or 'total'}):alpha*0.7+delta*-0.4"
    ids = llm.tokenize("The weather today")
    ours = await llm.complete(ids, SamplingParams(max_new_tokens=16), adapter=name)
    listed = {a.name: a for a in llm.adapters.list()}
    assert listed[name].rank == 8 and listed[name].kind == f"merge ({strategy})"
    assert listed["alpha"].kind == "lora"

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(tiny_adapters["alpha"]), adapter_name="alpha")
    peft_model.load_adapter(str(tiny_adapters["delta"]), adapter_name="delta")
    combine = LoraModel._generalized_task_arithmetic_weighted_adapter
    calls = []

    def seeded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not calls:
            torch.manual_seed(MERGE_SEED)
        calls.append(1)
        return combine(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter", seeded)
    peft_model.add_weighted_adapter(
        ["alpha", "delta"],
        [0.7, -0.4],
        "mix",
        combination_type=strategy,
        density=0.5,
        majority_sign_method=sign or "total",
    )
    assert len(calls) == 7 * 2  # every projection of both layers
    peft_model.set_adapter("mix")
    ref = peft_model.merge_and_unload().generate(
        torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert ours.token_ids[0] == ref[0, len(ids) :].tolist()
    plain = await llm.complete(ids, SamplingParams(max_new_tokens=16), adapter="alpha")
    assert ours.token_ids[0] != plain.token_ids[0]  # the merge changed something


async def test_merge_fields_are_checked(llm: LLM, tiny_adapters: dict[str, Path]) -> None:
    """What a strategy does not take is a 400 naming the field; ranks must agree for the
    task-arithmetic merges (a 422 that says to merge linearly)."""
    from openllm_clone.errors import AdapterIncompatibleError, InvalidRequestError

    for name in ("alpha", "beta"):
        await llm.adapters.load(name, str(tiny_adapters[name]))
    cases = [
        ({"strategy": "linear", "density": 0.5}, "density"),
        ({"strategy": "dare_linear", "majority_sign_method": "total"}, "majority_sign_method"),
        ({"strategy": "ties", "density": 1.5}, "density"),
        ({"strategy": "slerp"}, "merge_strategy"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidRequestError) as info:
            await llm.adapters.merged(["alpha", "beta"], [0.5, 0.5], **kwargs)
        assert info.value.param == field, kwargs
    name = await llm.adapters.merged(["alpha", "beta"], [0.5, 0.5], strategy="ties", density=0.5)
    with pytest.raises(AdapterIncompatibleError, match="ranks 4, 8"):
        await llm.complete(llm.tokenize("Hi"), SamplingParams(max_new_tokens=2), adapter=name)


async def test_adapter_in_the_model_store_loads_on_first_use(
    llm: LLM, tiny_adapters: dict[str, Path], bentoml_home: Path
) -> None:
    from openllm_clone.store import import_adapter

    tag = import_adapter(str(tiny_adapters["beta"]), name="stored-beta")
    ids = llm.tokenize("Hello")
    params = SamplingParams(max_new_tokens=6)
    by_tag = await llm.complete(ids, params, adapter=tag)
    by_name = await llm.complete(ids, params, adapter="stored-beta")  # latest version
    await llm.adapters.load("beta", str(tiny_adapters["beta"]))
    direct = await llm.complete(ids, params, adapter="beta")
    assert by_tag.token_ids == by_name.token_ids == direct.token_ids


@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "masked"])
def test_lora_bank_paths_equal_each_rows_own_adapter(
    per_token: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of applying many adapters equal x @ A_s.T @ B_s.T per token, also as the
    batch changes between steps (the per-token rows are updated, not rebuilt); slot 2 is
    DoRA: its tokens' outputs become ``(y + delta) * m / norm + (1 - m / norm) * bias``
    with the norm and bias the runner gives (a stand-in here: the real ones are checked
    against peft in the runner tests)."""
    import torch
    from openllm_clone.adapters.weights import AdapterWeights, LoraModule
    from openllm_clone.runners import lora as lora_mod

    monkeypatch.setattr(lora_mod, "_PER_TOKEN_MIN_ADAPTERS", 1 if per_token else 10**6)
    torch.manual_seed(0)
    dims = {"q_proj": (16, 24), "down_proj": (32, 16)}
    bank = lora_mod.LoraBank(
        dims, num_layers=2, num_slots=4, dtype=torch.float32, device=torch.device("cpu")
    )
    norms = {(layer, m): 1 + torch.rand(o) for layer in range(2) for m, (_, o) in dims.items()}
    biases = {key: torch.randn(n.shape[0]) for key, n in norms.items()}
    bank.dora_base = lambda layer, module, lora: (norms[layer, module], biases[layer, module])
    with torch.inference_mode():  # a compiled step asks for DoRA's stacks before any install
        bank.graph_inputs([0], tuple(dims))
    refs: dict[int, dict[tuple[int, str], LoraModule]] = {}
    for slot, rank in ((1, 4), (2, 8), (3, 2)):
        modules = {
            (layer, m): LoraModule(
                a=torch.randn(rank, i),
                b=torch.randn(o, rank),
                scale=0.5,
                magnitude=1 + torch.rand(o) if slot == 2 else None,
            )
            for layer in range(2)
            for m, (i, o) in dims.items()
            if not (slot == 3 and m == "down_proj")
        }
        bank.install(slot, AdapterWeights(path=f"slot{slot}", config={}, modules=modules))
        refs[slot] = modules
    # Base rows, repeats, an adapter without down_proj; then rows leave, join and move.
    for row_slots in ([2, 0, 1, 3, 2, 1], [2, 1, 3, 2, 1], [2, 1, 3, 2, 1, 3, 1], [1, 2, 3, 0]):
        row_lengths = [1] * len(row_slots)
        plan = bank.plan(row_slots, row_lengths)
        assert (plan.per_token is not None) == per_token
        for layer in range(2):
            for module, (i, o) in dims.items():
                x = torch.randn(len(row_slots), i)
                y = torch.randn(len(row_slots), o)
                got = bank.apply(plan, layer, module, x, y.clone())
                want = y.clone()
                for t, slot in enumerate(row_slots):
                    lora = refs.get(slot, {}).get((layer, module))
                    if lora is not None:
                        want[t] += (x[t] @ lora.a.T) @ (lora.b * lora.scale).T
                    if lora is not None and lora.magnitude is not None:
                        g = lora.magnitude / norms[layer, module]
                        want[t] = want[t] * g + (1 - g) * biases[layer, module]
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _NoHost:
    """A runner stand-in: the registry's bookkeeping without tensors."""

    def validate(self, weights: Any) -> None:
        pass

    async def install(self, slot: int, weights: Any) -> None:
        pass

    async def remove(self, slot: int) -> None:
        pass


async def test_workers_follow_one_runtime_adapter_file(
    tmp_path: Path, tiny_adapters: dict[str, Path]
) -> None:
    """Two registries (two workers) over one run-time adapter file: an add on one is served
    by the other, a failed add records nothing, a delete reaches the other once its request
    ends, and a fresh registry (a restart) finds what is left."""
    from openllm_clone.adapters.registry import AdapterRegistry
    from openllm_clone.adapters.shared import SharedAdapters

    path = str(tmp_path / "runtime.json")

    def worker() -> AdapterRegistry:
        return AdapterRegistry(
            _NoHost(), max_loaded=2, base_model_aliases=["x"], shared=SharedAdapters(path)
        )

    a, b = worker(), worker()
    await a.add("late", str(tiny_adapters["alpha"]), force=True)
    assert "late" in b.names()
    assert (await b.acquire("late")).slot > 0  # loaded there on first use
    with pytest.raises(OpenLLMCloneError):
        await a.add("bad", str(tmp_path / "nowhere"))
    assert "bad" not in b.names() and "bad" not in SharedAdapters(path).entries()
    await a.delete("late")
    assert "late" not in b.names()  # gone for new requests at once
    with pytest.raises(AdapterNotFoundError):
        await b.acquire("late")
    assert b.get("late") is not None  # the request in flight still holds it
    await b.release("late")
    for _ in range(50):
        if b.get("late") is None:
            break
        await asyncio.sleep(0.02)
    assert b.get("late") is None
    await a.add("kept", str(tiny_adapters["beta"]), force=True)
    assert worker().names() == ["kept"]
    with pytest.raises(AdapterNotFoundError):
        await a.delete("never")


class _FakeWeights:
    """What the registry reads of an adapter's weights, without tensors."""

    base_model = None
    rank = 8
    alpha = 16.0
    target_modules = ("q_proj",)
    size_bytes = 1
    kind = "lora"


class _SlotHost(_NoHost):
    """Records which adapter each slot holds; ``remove`` can be held up (a busy step)."""

    def __init__(self) -> None:
        self.slots: dict[int, Any] = {}
        self.gate = asyncio.Event()
        self.gate.set()

    async def install(self, slot: int, weights: Any) -> None:
        self.slots[slot] = weights

    async def remove(self, slot: int) -> None:
        await self.gate.wait()
        self.slots.pop(slot, None)


async def test_evict_never_frees_a_slot_a_request_took_while_it_waited() -> None:
    """Ray's LRU asks the registry to evict an idle adapter; the eviction waits for the
    registry's lock (held by another load whose step-gap call is slow). A request that
    takes the adapter meanwhile keeps it: the eviction re-checks under the lock."""
    from openllm_clone.adapters.registry import AdapterRegistry

    host = _SlotHost()
    registry = AdapterRegistry(host, max_loaded=2, base_model_aliases=[])
    weights = {name: _FakeWeights() for name in ("a", "b", "c")}
    registry._read = lambda source: asyncio.sleep(0, weights[source])  # type: ignore[method-assign]
    for name in ("a", "b"):
        await registry.load(name, name)
    registry.get("b").last_used = 0.0  # b is the LRU victim of c's load  # type: ignore[union-attr]
    host.gate.clear()  # b's removal (a step gap) is slow: c's load holds the lock meanwhile
    load_c = asyncio.create_task(registry.load("c", "c"))
    await asyncio.sleep(0.01)
    evict_a = asyncio.create_task(registry.evict("a"))  # idle now: Ray's LRU dropped it
    await asyncio.sleep(0.01)
    slot = (await registry.acquire("a")).slot  # a request for a, while the eviction waits
    host.gate.set()
    await load_c
    assert await evict_a is False
    assert host.slots[slot] is weights["a"] and registry.get("a").state == "ready"  # type: ignore[union-attr]
    await registry.release("a")
    assert await registry.evict("a") is True


async def test_each_load_of_a_slot_is_a_new_adapter_for_the_prefix_cache() -> None:
    from openllm_clone.adapters.registry import AdapterRegistry

    host = _SlotHost()
    registry = AdapterRegistry(host, max_loaded=1, base_model_aliases=[])
    weights = {name: _FakeWeights() for name in ("a", "b")}
    registry._read = lambda source: asyncio.sleep(0, weights[source])  # type: ignore[method-assign]
    refs = []
    for name in ("a", "b", "a"):  # one slot: each load evicts the previous adapter
        await registry.load(name, name)
        refs.append(await registry.acquire(name))
        await registry.release(name)
    assert [r.slot for r in refs] == [1, 1, 1]
    assert [r.name for r in refs] == ["a", "b", "a"]
    assert len({r.load for r in refs}) == 3  # so the KV of one never serves another
    assert await registry.acquire("a") == refs[2]  # the same load while it stays


async def test_two_unloads_of_one_adapter_free_its_slot_once() -> None:
    """A run-time adapter deleted on the router is unloaded twice on a replica (the
    router's "unloaded" list and the shared file, both at once). The second unload must
    not free the slot again: two later adapters would share it and one would serve with
    the other's weights."""
    from openllm_clone.adapters.registry import AdapterRegistry

    host = _SlotHost()
    registry = AdapterRegistry(host, max_loaded=3, base_model_aliases=[])
    weights = {name: _FakeWeights() for name in ("a", "b", "c", "d")}
    registry._read = lambda source: asyncio.sleep(0, weights[source])  # type: ignore[method-assign]
    await registry.load("a", "a")
    host.gate.clear()  # the step gap is slow: both unloads see the record before either ends
    first = asyncio.create_task(registry.unload("a"))
    second = asyncio.create_task(registry.unload("a"))
    await asyncio.sleep(0.01)
    host.gate.set()
    await asyncio.gather(first, second)
    assert registry.get("a") is None
    slots = [(await registry.load(n, n)).slot for n in ("b", "c", "d")]
    assert sorted(slots) == [1, 2, 3]
    assert all(host.slots[s] is weights[n] for s, n in zip(slots, "bcd"))


async def test_an_adapter_unloaded_while_it_loads_gives_its_slot_back() -> None:
    """Ray's multiplex load (no request counted yet) races an unload of the same name:
    the load ends without the adapter and its slot is free again."""
    from openllm_clone.adapters.registry import AdapterRegistry

    host = _SlotHost()
    registry = AdapterRegistry(host, max_loaded=1, base_model_aliases=[])
    weights = {name: _FakeWeights() for name in ("a", "b")}
    gate = asyncio.Event()

    async def read(source: str) -> Any:
        await gate.wait()
        return weights[source]

    registry._read = read  # type: ignore[method-assign]
    registry.register("a", "a")
    load = asyncio.create_task(registry.load("a"))
    await asyncio.sleep(0.01)
    await registry.unload("a")
    gate.set()
    with pytest.raises(AdapterNotFoundError):
        await load
    assert registry.get("a") is None and registry._free_slots == [1]
    assert (await registry.load("b", "b")).slot == 1
