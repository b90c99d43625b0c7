"""A Ray job runs the code that submitted it: the running linearsr package is staged as one
importable folder (Ray ships it as `py_modules`) with every library subpackage, and without the
demo/test scaffolding (linearsr.dev) or the benchmarks (linearsr.bench)."""

import os
import subprocess
import sys
import tomllib

from linearsr.cluster.jobs import PACKAGE, command, stage_package
from linearsr.core.codeid import SUBPACKAGES, code_id

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_the_staged_package_imports_on_its_own_with_the_library_and_without_the_scaffolding(tmp_path):
    staged = stage_package(str(tmp_path))
    assert staged == str(tmp_path / PACKAGE)
    assert sorted(os.listdir(staged)) == sorted(["__init__.py", "__main__.py", "main.py", *SUBPACKAGES])
    assert not os.path.exists(os.path.join(staged, "dev")) and not os.path.exists(os.path.join(staged, "bench"))
    assert not any("__pycache__" in d for d, _, _ in os.walk(staged))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        packages = [p for p in tomllib.load(f)["tool"]["setuptools"]["packages"]
                    if p.split(".")[1:2] not in (["dev"], ["bench"])]
    code = ("import importlib, sys\n"
            f"for name in {packages!r}:\n"
            "    m = importlib.import_module(name)\n"
            f"    assert m.__file__.startswith({str(tmp_path)!r}), (name, m.__file__)\n"
            "from linearsr.core.codeid import code_id\n"
            "print(code_id())")
    # Ray puts py_modules on PYTHONPATH, which wins over an installed linearsr (this checkout's
    # editable install is in site-packages here)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    # the copy reports the same code id as the package it was staged from
    assert proc.returncode == 0 and proc.stdout.strip() == code_id(), proc.stderr
    top_level = {p.split(".")[1] for p in packages if p.count(".") == 1}
    assert top_level == set(SUBPACKAGES), "SUBPACKAGES must list pyproject's top-level subpackages"


def test_the_job_command_runs_the_package_as_a_module():
    assert command("train", "--run", "s3://b/run one") == "python -m linearsr train --run 's3://b/run one'"
