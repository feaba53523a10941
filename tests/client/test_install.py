"""The SDK installs alone: a fresh virtual environment with only `pip install ./clients` imports
tta_client and has neither torch nor anything else of the server's or the benches' stack.

It builds a real venv (packages from the configured index, about half a minute with a warm pip cache);
it is part of the default suite and of CI, which reaches the package index."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

from tta_bench.paths import REPO_ROOT

#: What the server or the benches install and the SDK must not pull in.
NOT_INSTALLED = ("torch", "torchvision", "numpy", "scipy", "scikit-image", "fastapi", "redis", "tta-service")


def test_a_fresh_venv_with_only_the_client_imports_it_without_torch(tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.create(env, with_pip=True, clear=True)
    python = env / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(REPO_ROOT / "clients")],
        check=True,
        timeout=600,
    )
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    )
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "tta-client" in names and "httpx" in names and "pydantic" in names
    assert not names & set(NOT_INSTALLED), names & set(NOT_INSTALLED)
    probe = (
        "import importlib.util, sys, tta_client\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is importable'\n"
        "assert 'numpy' not in sys.modules\n"
        "c = tta_client.Client('http://127.0.0.1:1', retry=0)\n"
        "print(tta_client.__version__, tta_client.__file__)\n"
    )
    out = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    version, location = out.stdout.split()
    assert version == __import__("tta_client").__version__
    assert Path(location).is_relative_to(env), location  # the venv's copy, not the checkout's
    assert sys.prefix != str(env)
