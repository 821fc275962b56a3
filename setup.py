"""Package discovery for setuptools (everything else is in pyproject.toml).

The packages come from ``openllm_clone/_layout.py``, which the bento build uses too,
so the wheel holds every subpackage of the mapped folders without a list kept by hand.
"""

import runpy
from pathlib import Path

from setuptools import setup

_here = Path(__file__).resolve().parent
_layout = runpy.run_path(str(_here / "openllm_clone" / "_layout.py"))
_packages = _layout["discover_packages"](str(_here))
# The kernels' C++ sources (csrc/: data, built at run time by runners/kernels.py) ship as
# a package of their own, so that setuptools takes them (package-data in pyproject.toml).
_packages.update(_layout["DATA_ROOTS"])

setup(packages=sorted(_packages), package_dir=_packages)
