"""Multi-adapter benchmark: 16 concurrent requests over 1, 4, 16 and 64 LoRA adapters,
over 16 DoRA adapters and over 4 adapters with a trained head (modules_to_save).

Runs in one process on SmolLM2: the engine with no adapters (baseline), the engine
with requests spread over N distinct rank-8 adapters on all seven projections (for
N = 64, 64 requests run 16 at a time, so the batch's adapters change as requests
finish and join), and the naive way (peft ``set_adapter`` per request, requests one after another). Also
times loading a rank-8 adapter into a running engine and how long the running
streams stalled meanwhile. The DoRA row compares with the 16-LoRA row (same rank and
projections, plus the per-output rescale); the saved-head row with the 4-LoRA row (its
rows run the eager step and their own head). Prints a table; writes bench/out/adapters.png when
matplotlib is installed.

    python bench/adapters.py [--dtype bfloat16] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import table, workload  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(
    base_dir: str,
    root: Path,
    count: int,
    rank: int = 8,
    *,
    kind: str = "lora",
) -> list[Path]:
    """One real peft adapter, then copies with fresh random weights (same format).
    ``kind``: ``lora``, ``dora`` (magnitudes moved by ~5 % from the base's column norms)
    or ``saved`` (LoRA plus a trained ``lm_head``, modules_to_save)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=TARGETS,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
            use_dora=kind == "dora",
            modules_to_save=["lm_head"] if kind == "saved" else None,
        ),
    )
    first = root / f"{kind}-0"
    peft_model.save_pretrained(str(first))
    template = load_file(str(first / "adapter_model.safetensors"))
    paths = [first]
    for i in range(1, count):
        gen = torch.Generator().manual_seed(i)
        folder = root / f"{kind}-{i}"
        folder.mkdir()
        shutil.copy(first / "adapter_config.json", folder)
        tensors = {}
        for k, v in template.items():
            noise = torch.randn(v.shape, generator=gen)
            if "lora_A" in k or "lora_B" in k:
                tensors[k] = noise * (0.01 if "lora_B" in k else 0.05)
            else:  # a magnitude vector or a saved head: the first one's, moved a little
                tensors[k] = v * (1 + 0.05 * noise) if "magnitude" in k else v + 0.01 * noise
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        paths.append(folder)
    return paths


async def run_engine(
    llm, prompts: list[list[int]], new_tokens: int, adapters: list[str | None]
) -> float:
    from openllm_clone.protocol import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    await asyncio.gather(
        *(
            llm.complete(p, params, adapter=adapters[i % len(adapters)])
            for i, p in enumerate(prompts)
        )
    )
    return len(prompts) * new_tokens / (time.perf_counter() - t)


async def load_while_streaming(llm, prompt: list[int], path: Path) -> tuple[float, float, float]:
    """Load an adapter while 8 streams run: (load seconds, worst gap during load, median gap)."""
    from openllm_clone.protocol import SamplingParams

    stamps: list[float] = []
    done = asyncio.Event()

    async def stream() -> None:
        async for _ in llm.stream(prompt, SamplingParams(max_new_tokens=60, ignore_eos=True)):
            stamps.append(time.perf_counter())
        done.set()

    tasks = [asyncio.create_task(stream()) for _ in range(8)]
    await asyncio.sleep(0.5)
    t0 = time.perf_counter()
    await llm.adapters.load("hot-loaded", str(path))
    t1 = time.perf_counter()
    await asyncio.gather(*tasks)
    steps = sorted(set(round(s, 4) for s in stamps))
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    during = [b - a for a, b in zip(steps, steps[1:]) if b >= t0 and a <= t1] or [0.0]
    gaps.sort()
    return t1 - t0, max(during), gaps[len(gaps) // 2]


def naive_peft(
    base_dir: str,
    paths: list[Path],
    prompts: list[list[int]],
    new_tokens: int,
    dtype: str,
    count: int,
    device: str = "cpu",
) -> float:
    """peft set_adapter per request, requests one after another (on the engine's device)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    peft_model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:count], start=1):
        peft_model.load_adapter(str(p), adapter_name=f"a{i}")
    peft_model.to(device).eval()
    t = time.perf_counter()
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            peft_model.set_adapter(f"a{i % count}")
            peft_model.generate(
                input_ids=torch.tensor([ids], device=device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
    return len(prompts) * new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--counts", default="1,4,16,64")
    ap.add_argument("--naive-requests", type=int, default=4)
    ap.add_argument(
        "--compile",
        default="off",
        choices=["off", "on"],
        help="the engine's --compile (on: compiled decode steps, built first)",
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    from openllm_clone.llm import LLM
    from openllm_clone.settings import Settings
    from openllm_clone.store import resolve_model

    counts = [int(c) for c in args.counts.split(",")]
    base_dir = str(resolve_model(args.model).path)
    root = Path(tempfile.mkdtemp())
    paths = make_adapters(base_dir, root, max(counts) + 1)
    dora = make_adapters(base_dir, root, args.requests, kind="dora")
    saved = make_adapters(base_dir, root, 4, kind="saved")
    llm = LLM.from_settings(
        Settings(
            model=args.model,
            dtype=args.dtype,
            max_batch_size=args.requests,
            max_adapters=max(counts) + 1 + len(dora) + len(saved),
            compile=args.compile,
        )
    )
    llm.runner.warmup()
    prompts = [llm.tokenize(llm.chat_prompt_text(q)) for q, _ in workload(args.requests, seed=0)]

    async def go() -> dict[str, float]:
        res: dict[str, float] = {}
        for i, p in enumerate(paths[: max(counts)]):
            await llm.adapters.load(f"a{i}", str(p))
        # Warm-up: first-call costs (buffers the per-token LoRA path allocates once,
        # about 0.25 s on SmolLM2) stay out of the timed runs.
        await run_engine(llm, prompts[:4], 8, [None])
        await run_engine(llm, prompts, 8, [f"a{i}" for i in range(len(prompts))])
        res["none"] = await run_engine(llm, prompts, args.new_tokens, [None])
        for prefix, folders in (("d", dora), ("s", saved)):
            for i, p in enumerate(folders):
                await llm.adapters.load(f"{prefix}{i}", str(p))
            names = [f"{prefix}{i}" for i in range(len(folders))]
            await run_engine(llm, prompts, 8, names)  # warm-up
            res[prefix] = await run_engine(llm, prompts, args.new_tokens, names)
        for n in counts:
            # More adapters than concurrent requests: n requests, 16 at a time, so every
            # adapter is used and the batch's adapters change as requests finish.
            batch = (prompts * (n // len(prompts) + 1))[: max(len(prompts), n)]
            res[f"n{n}"] = await run_engine(
                llm, batch, args.new_tokens, [f"a{i}" for i in range(n)]
            )
        res["load_s"], res["load_gap"], res["median_gap"] = await load_while_streaming(
            llm, prompts[0], paths[max(counts)]
        )
        return res

    res = asyncio.run(go())
    device = llm.runner.info.device
    llm.shutdown()
    naive = naive_peft(
        base_dir,
        paths,
        prompts[: args.naive_requests],
        args.new_tokens,
        args.dtype,
        min(16, max(counts)),
        device,
    )
    rows = [["no adapters (baseline)", res["none"], "1.00x", f"{res['none'] / naive:.2f}x"]]
    for n in counts:
        label = (
            f"{args.requests} requests over {n} adapter(s)"
            if n <= args.requests
            else f"{n} requests ({args.requests} at a time) over {n} adapters"
        )
        rows.append(
            [
                label,
                res[f"n{n}"],
                f"{res[f'n{n}'] / res['none']:.2f}x",
                f"{res[f'n{n}'] / naive:.2f}x",
            ]
        )
    trained = [
        ("d", len(dora), "DoRA adapters", args.requests),
        ("s", len(saved), "adapters with a trained lm_head", 4),
    ]
    for key, n, what, plain in trained:
        vs = f" ({res[key] / res[f'n{plain}']:.2f}x LoRA)" if f"n{plain}" in res else ""
        rows.append(
            [
                f"{args.requests} requests over {n} {what}{vs}",
                res[key],
                f"{res[key] / res['none']:.2f}x",
                f"{res[key] / naive:.2f}x",
            ]
        )
    rows.append(
        ["naive: peft set_adapter, one at a time", naive, f"{naive / res['none']:.2f}x", "1.00x"]
    )
    print(
        f"\nmodel {args.model}, {args.dtype} on {device} (--compile {args.compile}), rank 8 on "
        f"all 7 projections, {args.requests} "
        f"concurrent requests x {args.new_tokens} tokens (greedy, ignore_eos)"
    )
    print(table(["engine", "tok/s", "vs no adapters", "vs naive"], rows))
    print(
        f"\nloading a rank-8 adapter into the running engine: {res['load_s'] * 1000:.0f} ms; "
        f"longest gap between steps of 8 running streams meanwhile: {res['load_gap'] * 1000:.0f} ms "
        f"(median step gap {res['median_gap'] * 1000:.0f} ms)"
    )
    (OUT / "adapters.json").write_text(json.dumps({**res, "naive": naive}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.plot(counts, [res[f"n{n}"] for n in counts], "o-", label="openllm-clone")
        plt.axhline(res["none"], ls="--", label="no adapters")
        plt.axhline(naive, ls=":", label="naive set_adapter")
        plt.xscale("log", base=2)
        plt.xlabel("distinct adapters among 16 requests")
        plt.ylabel("tokens/s")
        plt.legend()
        plt.savefig(OUT / "adapters.png", dpi=100)
    except ImportError:
        print("(matplotlib not installed: no plot)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
