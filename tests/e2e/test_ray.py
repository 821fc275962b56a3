"""Two Ray Serve replicas behind the adapter-aware router (tiny model, 4 adapters).

Ray listens on every interface, so the scenario (server and client) runs inside a
network namespace with only loopback (``unshare --net``; needs root, as CI is). The
test skips, saying why, where that namespace cannot be made or Ray is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import make_keys_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Replicas share the load"


def _why_not() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'openllm-clone[ray]')"
    if os.geteuid() != 0:
        return "a loopback-only network namespace needs root (unshare --net)"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip (iproute2) is missing"
    probe = subprocess.run(
        ["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot make a network namespace: {probe.stderr.strip()}"
    return None


def _reference(
    model: Path, adapters: dict[str, Path], names: list[str | None], max_new_tokens: int
) -> dict[str, list[int]]:
    """Greedy token ids of PROMPT per adapter from the in-process LLM (no Ray)."""
    from openllm_clone.llm import LLM
    from openllm_clone.protocol import SamplingParams
    from openllm_clone.settings import AdapterSpec, Settings

    settings = Settings(
        model=str(model),
        dtype="float32",
        kv_cache_mb=32,
        adapters=[AdapterSpec(name=n, source=str(p)) for n, p in adapters.items()],
    )
    llm = LLM.from_settings(settings)

    async def run() -> dict[str, list[int]]:
        await llm.start()
        out = {}
        for n in names:
            result = await llm.complete(
                llm.tokenize(PROMPT),
                SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
                adapter=n,
            )
            out[str(n)] = result.token_ids[0]
        return out

    try:
        return asyncio.run(run())
    finally:
        llm.shutdown()


def test_two_ray_replicas_route_by_adapter_and_survive_a_replica_kill(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    report_path, log = tmp_path / "report.json", tmp_path / "ray-server.log"
    scenario = [
        sys.executable,
        "-m",
        "tests.e2e.ray_scenario",
        "--model",
        str(tiny_model_dir),
        "--extra-adapter",
        f"epsilon={tiny_adapters['alpha']}",
        "--report",
        str(report_path),
        "--log",
        str(log),
    ]
    for name, path in tiny_adapters.items():
        scenario += ["--adapter", f"{name}={path}"]
    # Tenants: an all-access admin key through the environment (the client reads it, the
    # server takes it as --api-key) and three scoped keys in a keys file.
    keys = make_keys_file(
        tmp_path / "keys.toml",
        {
            "acme": {"adapters": ["alpha"], "base_model": False},
            "limited": {"requests_per_minute": 2},
            "thrifty": {"tokens_per_minute": 30},
            "canceller": {"adapters": ["alpha"]},
        },
    )
    (tmp_path / "tenant-keys.json").write_text(json.dumps(keys))
    scenario += ["--keys-file", str(tmp_path / "keys.toml")]
    scenario += ["--tenant-keys", str(tmp_path / "tenant-keys.json")]
    cmd = [
        "unshare",
        "--net",
        "bash",
        "-c",
        "ip link set lo up && exec " + " ".join(f"'{a}'" for a in scenario),
    ]
    env = {**os.environ, "OPENLLM_CLONE_API_KEY": "sk-ray-admin"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    server_log = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n{server_log}"
    report: dict[str, Any] = json.loads(report_path.read_text())

    names: list[str | None] = [None, *tiny_adapters]
    expected12 = _reference(tiny_model_dir, tiny_adapters, names, 12)
    expected48 = _reference(tiny_model_dir, tiny_adapters, names, 48)

    # Right outputs: alone and under 40 concurrent requests, equal to the in-process LLM.
    assert report["solo"] == expected12
    assert len({tuple(v) for v in expected12.values()}) == len(names)  # adapters differ
    assert len(report["concurrent"]) == 40
    for name, tokens in report["concurrent"]:
        assert tokens == expected12[name], name

    # Affinity: after the warm-up, the 40 concurrent requests loaded no adapter anywhere
    # new, and each adapter was loaded on exactly one replica.
    steady, before = report["routing_after_steady"], report["routing_before"]
    assert steady["adapter_loads"] == before["adapter_loads"], steady
    for adapter in tiny_adapters:
        assert len(steady["adapter_loads"][adapter]) == 1, steady["adapter_loads"]
    assert len(steady["requests_by_replica"]) == 2  # both replicas served
    hits = steady["adapter_cache_hits"] - before["adapter_cache_hits"]
    misses = steady["adapter_cache_misses"] - before["adapter_cache_misses"]
    assert hits == 32 and misses == 0  # 8 requests for each of the 4 adapters, all hits

    # Run-time adapters: a bad source is a 4xx; a good one serves on any replica; unload.
    assert report["bad_load"][0] in (400, 404, 422) and "error" in report["bad_load"][1]
    assert report["extra_loaded"]["name"] == "epsilon"
    assert all(t == expected12["alpha"] for t in report["extra_outputs"])  # same weights as alpha
    assert "epsilon" in report["extra_listed"]
    assert report["extra_unload"]["deleted"] is True
    assert report["extra_after_unload"] == 404
    # Unknown on every replica: the replica's 404, as JSON, through the router.
    assert report["unknown_adapter"][0] == 404
    assert report["unknown_adapter"][1]["error"]["type"] == "adapter_not_found"
    assert report["chat_model"] == "alpha" and report["chat_stream_events"] >= 2

    # A replica killed mid-run, while it streamed: the cut stream ended in a 503
    # "unavailable" error after its first tokens (never retried: it had returned tokens);
    # every other request completed (the client retried those the dead replica held)
    # with the right tokens.
    kill = report["kill"]
    assert kill["stream"]["events"] >= 1 and kill["stream"]["error"] == [503, "unavailable"], kill
    assert 0 <= kill["done_at_kill"] < 40  # the kill came while requests were running
    assert len(kill["results"]) == 40
    assert report["solo48"] == expected48
    for name, tokens in kill["results"]:
        assert tokens == expected48[name], name
    after = report["routing_after_kill"]
    assert after["unavailable"] >= 1, after  # at least the cut stream
    assert report["metrics_has_cache"]
    _check_tenants(report, expected12["alpha"])
    # A run-time adapter outlives the router: killed, restarted by Ray Serve, it serves
    # the adapter (alpha's weights under another name) from the run-time adapter file.
    restart = report["router_restart"]
    assert restart["loaded"] == 200 and restart["routers"], restart
    assert restart["listed"] and restart["status"] == 200, restart
    assert restart["tokens"] == expected12["alpha"]


def _check_tenants(report: dict[str, Any], expected_alpha: list[int]) -> None:
    """Scopes, limits and usage through the Ray router, as on a single server."""
    t = report["tenants"]
    assert t["acme_models"] == ["alpha"] and t["acme_adapters"] == ["alpha"]
    (scope_status, scope_body), (missing_status, missing_body) = (
        t["out_of_scope"][0],
        t["missing"][0],
    )
    assert scope_status == missing_status == 404
    assert json.dumps(scope_body).replace("beta", "X") == json.dumps(missing_body).replace(
        "nope", "X"
    )
    assert t["base"] == [403, "permission_denied"]
    assert t["acme_alpha_tokens"] == expected_alpha  # served by the adapter, exactly
    assert t["limited"] == [[200, "1"], [200, "0"], [429, "0"]]
    assert t["thrifty"][-1] == 429 and "tokens per minute" in t["thrifty_error"]
    acme = t["usage"]["tenants"]["acme"]["adapters"]["alpha"]
    assert [acme["requests"], acme["prompt_tokens"], acme["completion_tokens"]] == t["acme_told"]
    assert t["usage_by_acme"] == 403
    # A stream cancelled by its client counts as on a single server: the replica reports
    # its tokens to the router after the router cancelled it.
    c = t["cancelled"]
    assert c["requests"] == c["cancelled"] == 1 and c["prompt_tokens"] > 0, c
    assert 1 <= c["completion_tokens"] < 400, c


def test_ray_start_exits_on_an_adapter_it_cannot_serve(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """`start --backend ray` with a start-up adapter over --max-adapter-rank: the replica
    refuses it when it is built, the deployment fails after Ray's retries, and `start`
    exits 1 with the replica's reason on one line (not Ray's traceback)."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    start = [
        sys.executable,
        "-m",
        "openllm_clone",
        "start",
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "--backend",
        "ray",
        "--port",
        "3000",  # inside its own network namespace: no other server there
        "--max-adapter-rank",
        "4",
        "--adapter-id",
        f"wide={tiny_adapters['alpha']}",
    ]
    cmd = ["unshare", "--net", "bash", "-c", "ip link set lo up && exec " + " ".join(start)]
    env = {**os.environ, "COLUMNS": "250"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    line = next(x for x in output.splitlines() if x.startswith("error: "))
    assert line.startswith("error: the Ray deployment failed: adapter 'wide'"), line
    assert "exceeds the server's limit 4" in line and "--lenient-adapters" in line
