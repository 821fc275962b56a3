"""Where the import namespace's packages live in the source tree: the one mapping.

The top-level folders of the repository are mapped into the ``openllm_clone``
namespace (``runners/`` is ``openllm_clone.runners``, and so on: see
``shared/ARCHITECTURE.md``). ``setup.py`` reads this file to build the wheel and
``bento.py`` to copy the code into a bento, so a new subpackage (any folder with an
``__init__.py`` under a mapped root) is found by both without being listed anywhere.

Standard library only: ``setup.py`` runs it with :func:`runpy.run_path` before the
package is installed.
"""

from __future__ import annotations

import os

__all__ = ["DATA_ROOTS", "PACKAGE_ROOTS", "csrc_folder", "discover_packages"]

# import name -> folder, relative to the repository root.
PACKAGE_ROOTS: dict[str, str] = {
    "openllm_clone": "openllm_clone",
    "openllm_clone.adapters": "adapters",
    "openllm_clone.runners": "runners",
    "openllm_clone.cli": "cli",
    "openllm_clone.integrations": "integrations",
}


# Folders of data that ship inside the namespace (import name -> folder): the kernels' C++
# sources, built on the serving machine by runners/kernels.py.
DATA_ROOTS: dict[str, str] = {"openllm_clone.runners.csrc": "csrc"}


def csrc_folder(runners_dir: str) -> str:
    """The kernels' C++ sources for the ``openllm_clone.runners`` package in
    ``runners_dir``: ``csrc/`` inside it (a wheel, a bento), else the repository's
    top-level ``csrc/`` beside it (a source tree)."""
    for folder in (os.path.join(runners_dir, "csrc"), os.path.join(runners_dir, "..", "csrc")):
        if os.path.isfile(os.path.join(folder, "ops.cpp")):
            return os.path.normpath(folder)
    raise FileNotFoundError(f"the kernels' C++ sources (csrc/) are not beside {runners_dir}")


def discover_packages(root: str = ".") -> dict[str, str]:
    """Every package under the mapped roots: import name -> folder (relative to ``root``)."""
    found: dict[str, str] = {}
    for name, folder in PACKAGE_ROOTS.items():
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(
                d for d in dirnames if d != "__pycache__" and not d.startswith(".")
            )
            if "__init__.py" not in filenames:
                dirnames[:] = []  # not a package: nothing below it is importable either
                continue
            rel = os.path.relpath(dirpath, base)
            sub = "" if rel == "." else "." + rel.replace(os.sep, ".")
            found[name + sub] = os.path.relpath(dirpath, root).replace(os.sep, "/")
    return found
