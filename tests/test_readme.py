"""Every command in README.md runs as written.

The test extracts the README's ```bash blocks, splits them into commands (a multi-line ``for ... done`` is
one command) and runs them in order, block by block, in a scratch copy of the repository's examples with a
``.venv/bin`` that runs this checkout's prelort: the fast test every command on the tiny model, the slow test
(``-m slow``) the commands on SmolLM2 (the demo, the comparison recipe) and the README's Python snippets.
A command added to the README is picked up automatically; only the lists below name exceptions.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Commands run elsewhere: the installer by CI (.ci/run, on a fresh machine) and the test commands (this test
# is one of the tests they run).
ELSEWHERE = (re.compile(r"scripts/install\.sh"), re.compile(r"-m pytest"))
# Commands on the real SmolLM2 model: the slow suite.
SLOW = (
    re.compile(r"examples/demo\.yaml|runs/demo\b"),
    re.compile(r"examples/compare\.yaml|runs/compare-|runs/report-compare"),
)
TIMEOUT_S = 1800
# Snippets that use an optional package (a pyproject extra that scripts/install.sh leaves out) run where it is
# installed: llama-cpp-python builds llama.cpp from source.
OPTIONAL_PACKAGES = ("llama_cpp",)


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _complete(command: str) -> bool:
    return subprocess.run(["bash", "-n", "-c", command], capture_output=True).returncode == 0


def commands(block: str) -> list[str]:
    """The block's commands: lines joined until bash parses them as complete (for/if/continuations)."""
    out, pending = [], ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending = f"{pending}\n{line}" if pending else line
        if _complete(pending):
            out.append(pending)
            pending = ""
    assert not pending, f"README command does not parse: {pending!r}"
    return out


def readme_commands() -> list[list[str]]:
    return [commands(b) for b in fenced_blocks(README.read_text(), "bash")]


def is_elsewhere(command: str) -> bool:
    return any(p.search(command) for p in ELSEWHERE)


def is_slow(command: str) -> bool:
    return any(p.search(command) for p in SLOW)


@pytest.fixture()
def sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A directory like a fresh clone after scripts/install.sh: examples/ and a .venv/bin with prelort."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")  # examples/lm-eval/ included
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, target in (("prelort", f'"{sys.executable}" -m prelort'), ("python", f'"{sys.executable}"')):
        script = bin_dir / name
        script.write_text(f'#!/usr/bin/env bash\nexec {target} "$@"\n')
        script.chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return tmp_path, env


ACTIVATE = ". .venv/bin/activate"


def run_block(cmds: list[str], cwd: Path, env: dict[str, str], activated: bool) -> None:
    """One bash process per README block, activated as the reader's shell is once the README activated it;
    stops at the first command that fails and names it."""
    script = ["set -eo pipefail"] + ([ACTIVATE] if activated else [])
    for i, cmd in enumerate(cmds):
        script.append(f"echo '>>> README command {i}' >&2")
        script.append(cmd)
    res = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if res.returncode != 0:
        done = re.findall(r">>> README command (\d+)", res.stderr)
        failed = cmds[int(done[-1])] if done else "?"
        pytest.fail(f"README command failed (exit {res.returncode}): {failed}\n--- stderr tail:\n{res.stderr[-3000:]}")


def test_readme_blocks_parse_and_every_command_is_classified():
    blocks = readme_commands()
    flat = [c for b in blocks for c in b]
    assert any("examples/tiny.yaml" in c for c in flat), "the quickstart runs the tiny model"
    assert any(is_slow(c) for c in flat) and any(is_elsewhere(c) for c in flat)
    # a README update must be produced by the README: the quickstart's verify-update checks an audited update
    verify = [c for c in flat if "verify-update" in c and not is_slow(c)]
    assert verify and all("--round" in c for c in verify)
    assert commands("for m in a b; do\n  echo $m\ndone\necho x") == ["for m in a b; do\n  echo $m\ndone", "echo x"]


def test_readme_commands_on_the_tiny_model_run_as_written(sandbox):
    cwd, env = sandbox
    ran, activated = 0, False
    for block in readme_commands():
        # a block stops at its first slow command: what follows it there needs its output
        cmds = []
        for c in block:
            if is_slow(c):
                break
            if not is_elsewhere(c):
                cmds.append(c)
        if any(c.strip() != ACTIVATE for c in cmds):
            run_block(cmds, cwd, env, activated)
            ran += len(cmds)
        activated = activated or any(c.strip() == ACTIVATE for c in block)
    assert ran >= 8
    # what the quickstart promises, on disk
    assert (cwd / "runs" / "tiny" / "adapters").is_dir()
    assert (cwd / "runs" / "report-tiny" / "comparison.md").is_file()


@pytest.mark.slow
def test_readme_commands_on_smollm2_and_python_snippets_run_as_written(sandbox):
    cwd, env = sandbox
    activated = False
    for block in readme_commands():
        cmds = [c for c in block if not is_elsewhere(c)]
        if any(is_slow(c) for c in cmds):
            run_block(cmds, cwd, env, activated)
        activated = activated or any(c.strip() == ACTIVATE for c in block)
    for i, snippet in enumerate(fenced_blocks(README.read_text(), "python")):
        missing = [
            m for m in OPTIONAL_PACKAGES if re.search(rf"^import {m}\b", snippet, flags=re.M) and not find_spec(m)
        ]
        if missing:
            continue  # a snippet for an optional package this environment lacks (pyproject's extras)
        res = subprocess.run(
            [sys.executable, "-c", snippet], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
        assert res.returncode == 0, f"README Python snippet {i} failed:\n{snippet}\n{res.stderr[-3000:]}"
