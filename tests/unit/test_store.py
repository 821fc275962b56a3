"""Store writes are atomic: an interrupted import leaves nothing, a broken entry left by an
older save does not break listings, and a full disk is a clear error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from openllm_clone import store
from openllm_clone.errors import ModelLoadError


def _names() -> set[str]:
    return {m.tag.split(":")[0] for m in store.list_models()}


def test_an_interrupted_import_leaves_no_entry_and_a_second_succeeds(
    tiny_model_dir: Path, bentoml_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # the process dies between the copy and the rename

    monkeypatch.setattr(store.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        store.import_model(str(tiny_model_dir), name="interrupted")
    monkeypatch.undo()
    assert "interrupted" not in _names()
    assert store._get_stored("interrupted") is None
    leftovers = list((bentoml_home / store.STAGING).iterdir())
    assert leftovers  # what a kill leaves: outside the store, swept after an hour
    tag = store.import_model(str(tiny_model_dir), name="interrupted")
    assert "interrupted" in _names()
    assert (Path(store.resolve_model(tag).path) / "config.json").is_file()
    old = os.path.getmtime(leftovers[0]) - 7200
    os.utime(leftovers[0], (old, old))
    store.import_model(str(tiny_model_dir), name="interrupted")
    assert not leftovers[0].exists()


def test_a_half_written_entry_does_not_break_listing(bentoml_home: Path) -> None:
    broken = bentoml_home / "models" / "half" / "v1abc"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")  # no model.yaml: a save killed mid-copy
    try:
        assert "half" not in _names()
        with pytest.raises(ModelLoadError):
            store.resolve_model("half")
    finally:
        shutil.rmtree(broken.parent)


def _can_mount_tmpfs() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "a private tmpfs needs root and unshare"
    probe = subprocess.run(
        ["unshare", "--mount", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/mnt"],
        capture_output=True,
    )
    return None if probe.returncode == 0 else "mount -t tmpfs is not allowed here"


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The store on a 512 KiB tmpfs (in a private mount namespace): import exits 1 naming
    the store and the bytes it needs, and the store lists nothing."""
    reason = _can_mount_tmpfs()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "small-home"
    home.mkdir()
    cli = f"'{sys.executable}' -m openllm_clone"
    script = (
        f"mount -t tmpfs -o size=512k tmpfs '{home}' && "
        f"BENTOML_HOME='{home}' {cli} import '{tiny_model_dir}' --name big; "
        f"echo import-rc=$?; BENTOML_HOME='{home}' {cli} models"
    )
    out = subprocess.run(
        ["unshare", "--mount", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "1000"},
    )
    text = out.stdout + out.stderr
    assert "import-rc=1" in text, text[-3000:]
    assert "not enough disk space" in text and "bytes" in text and str(home) in text, text[-3000:]
    assert out.returncode == 0, text[-3000:]  # `models` still works
    assert "big" not in out.stdout
