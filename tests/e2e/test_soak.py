"""The soak script's short version: 30 s of mixed traffic (streams, whole answers,
cancellations, invalid requests, an adapter loaded and unloaded at run time) against the
real server; no valid request may be lost and no request may get a 5xx. The 30-minute
run with its leak and latency targets is `python bench/soak.py` (not in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_loses_nothing(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    report = tmp_path / "soak.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "soak.py"),
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "--minutes",
        "0.5",
        "--warmup",
        "0.2",
        "--window",
        "0.25",
        "--concurrency",
        "16",
        "--sample-every",
        "5",
        "--json",
        str(report),
    ]
    for path in tiny_adapters.values():
        cmd += ["--adapter-dir", str(path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert report.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["lost"] == [], result["lost"][:10]
    assert out.returncode == 0, out.stdout[-3000:]
    counts = result["counts"]
    for kind in ("whole", "stream", "cancelled", "invalid", "adapter_load", "adapter_unload"):
        assert counts.get(kind, 0) > 0, counts
    # (requests ending after the last window's end are counted but not in a window)
    assert 0 < sum(w["requests"] for w in result["windows"]) <= counts["whole"]
