"""lm-eval against the real server (``local-completions``, batch size 4, its remote
tokenizer on our /tokenize routes) on two small tasks shipped in tests/lm_eval_tasks/: a
multiple_choice task (loglikelihood: token-id prompts, echo, logprobs) and a generate_until
task. Both must equal lm-eval's own ``hf`` model on the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Server

pytest.importorskip("lm_eval")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_server(shared_tiny_server: Server) -> Server:
    """This module only sends requests: the session's shared server serves it."""
    return shared_tiny_server


TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
TASKS = ["openllm_clone_choice", "openllm_clone_gen"]


def _tasks(tmp: Path) -> Any:
    """The shipped task files, with their data paths made absolute."""
    from lm_eval.tasks import TaskManager

    for yaml in TASKS_DIR.glob("*.yaml"):
        (tmp / yaml.name).write_text(yaml.read_text().replace("__DATA__", str(TASKS_DIR)))
    return TaskManager(include_path=str(tmp))


def _samples(results: dict[str, Any], task: str) -> list[Any]:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_scores_equal_its_hf_model(
    tiny_server: Server, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = _tasks(tmp_path)
    ours = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny-llama,base_url={tiny_server.url}/v1/completions,tokenizer_backend=remote,"
        "tokenized_requests=True,num_concurrent=1,max_retries=1",
        tasks=TASKS,
        task_manager=manager,
        batch_size=4,
        log_samples=True,
    )
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model_dir},dtype=float32,device=cpu",
        tasks=TASKS,
        task_manager=manager,
        batch_size=1,
        log_samples=True,
    )
    assert ours is not None and theirs is not None
    got, want = _samples(ours, TASKS[0]), _samples(theirs, TASKS[0])
    assert len(got) == len(want) == 7
    for doc_got, doc_want in zip(got, want, strict=True):
        assert len(doc_got) == len(doc_want)  # one loglikelihood per choice
        for (ll_got, greedy_got), (ll_want, greedy_want) in zip(
            [r[0] for r in doc_got], [r[0] for r in doc_want], strict=True
        ):
            assert abs(float(ll_got) - float(ll_want)) < 1e-3
            assert bool(greedy_got) == bool(greedy_want)
    assert ours["results"][TASKS[0]]["acc,none"] == theirs["results"][TASKS[0]]["acc,none"]
    gen_got, gen_want = _samples(ours, TASKS[1]), _samples(theirs, TASKS[1])
    assert len(gen_got) == 5 and gen_got == gen_want
    assert all(g[0][0] for g in gen_got)  # the model wrote something for every question
