"""The README's quick-start example runs as written: the sample files it names exist in the repository,
and the requests it shows (PUT a policy, predict both files, read the stream) succeed on the app with
the shipped model, which sees a cat and a dog."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.conftest import REPO

README = REPO / "README.md"


def _example_commands() -> list[list[str]]:
    text = README.read_text()
    block = text.split("Try it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.strip().splitlines() if line.strip()]


def test_the_readme_example_names_files_that_exist() -> None:
    files = [arg.split("@", 1)[1] for cmd in _example_commands() for arg in cmd if arg.startswith("files=@")]
    assert len(files) == 2, files
    for name in files:
        path = REPO / name
        assert path.is_file() and path.stat().st_size > 0, name
    tta_lines = re.findall(r"^TTA_URL=\S+ tta predict (.+)$", README.read_text(), flags=re.M)
    assert tta_lines and all((REPO / f).is_file() for f in shlex.split(tta_lines[0])[1:])


def test_the_readme_example_requests_succeed(make_client) -> None:
    client = make_client()
    put, predict, read = _example_commands()
    assert put[:3] == ["curl", "-X", "PUT"] and "-F" in predict
    path = "/" + put[3].split("/", 1)[1]
    r = client.put(path, content=put[put.index("-d") + 1], headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    files = [
        ("files", (Path(a[7:]).name, (REPO / a[7:]).read_bytes())) for a in predict if a.startswith("files=@")
    ]
    r = client.post("/" + predict[-1].split("/", 1)[1], files=files)
    assert r.status_code == 200, r.text
    labels = [p["top_k"][0]["label"] for p in r.json()["predictions"]]
    assert labels == ["cat", "dog"]
    r = client.get("/" + read[1].split("/", 1)[1])
    assert r.status_code == 200 and r.json()["strategy"] == "tent" and r.json()["samples_seen"] == 2
