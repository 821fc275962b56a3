"""Check the import contracts (pyproject.toml's [tool.importlinter]) on the assembled
namespace: the mapped folders (openllm_clone/_layout.py) copied into one package tree in
a temporary folder, as the wheel lays them out (import-linter reads the files of a
package's own folder, and the source tree keeps runners/, adapters/, ... beside it)."""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    layout = runpy.run_path(str(ROOT / "openllm_clone" / "_layout.py"))
    with tempfile.TemporaryDirectory(prefix="lint-imports-") as tmp:
        for name, folder in sorted(layout["discover_packages"](str(ROOT)).items()):
            target = Path(tmp).joinpath(*name.split("."))
            target.mkdir(parents=True, exist_ok=True)
            for file in (ROOT / folder).glob("*.py"):
                shutil.copy(file, target / file.name)
        sys.path.insert(0, tmp)
        os.chdir(tmp)  # not the source tree, whose openllm_clone/ lacks the mapped folders
        from importlinter.cli import lint_imports

        return int(lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True))


if __name__ == "__main__":
    raise SystemExit(main())
