"""The docs cannot drift from the code: every command and Python block of README.md runs as
written, the README's links resolve, and docs/zoo.md's model table matches the models' cards.

Commands run through the `accelerando` CLI in this process (`./run X` is `accelerando X`, as the
`run` script says), with ACCELERANDO_HISTORY pointed at a temporary file. A command too long for a
test is in README_SKIP with its reason and a cheaper equivalent that runs instead; a command that
fails because of a known open bug is in README_XFAIL (strict: the test fails once the bug is fixed,
so the entry must then be removed); a case over ~20 s is marked slow through README_SLOW. As in
every test (conftest.py), LLM decoding runs on the eager engine (ACCELERANDO_ENGINE=engine-eager):
the same code without torch.compile. docs/testing.md describes this.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# command as written in the README (comments stripped) -> (why it is not run, what runs instead or None)
README_SKIP = {
    "./run demo": ("runs every registered method on the zoo models: minutes",
                   "accelerando demo --family diffusion --steps 5 --samples 1 --reference-steps 10 --repeats 1"),
    "./run test": ("it is the test suite this test belongs to", None),
}
# text in a README case -> why it is marked slow (it runs in the full suite, not in `-m "not slow"`)
README_SLOW = {
    "accelerando bench digits-unet": "samples a 200-step reference for the quality column",
}
# command as written -> why it fails today (pytest.mark.xfail(strict=True))
README_XFAIL: dict[str, str] = {}


def _blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, first line number, body) of every fenced block."""
    out, lang, start, body = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip() or "text", n + 1, []
            else:
                out.append((lang, start, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, "README.md has an unclosed code fence"
    return out


def _commands(body: str) -> list[str]:
    """Shell lines of a bash block as written, continuations joined, comments and blank lines dropped."""
    lines = (re.sub(r"(^|\s+)#.*$", "", line).strip() for line in body.replace("\\\n", " ").splitlines())
    return [line for line in lines if line]


def _slow(code: str) -> list:
    return [pytest.mark.slow] if any(s in code for s in README_SLOW) else []


def _cases():
    cases = []
    for lang, line, body in _blocks(README.read_text()):
        if lang == "python":
            cases.append(pytest.param("python", body, id=f"python-line-{line}", marks=_slow(body)))
        elif lang in ("bash", "sh", "shell", "console"):
            for cmd in _commands(body):
                marks = [pytest.mark.xfail(strict=True, reason=README_XFAIL[cmd])] if cmd in README_XFAIL else []
                cases.append(pytest.param("command", cmd, id=cmd, marks=marks + _slow(cmd)))
        else:
            raise AssertionError(f"README.md line {line}: code block of unknown language {lang!r} (use python or bash)")
    return cases


@pytest.fixture
def readme_env(monkeypatch, tmp_path):
    """A temporary history and working directory; torch's thread count restored afterwards."""
    import torch
    monkeypatch.setenv("ACCELERANDO_HISTORY", str(tmp_path / "history.sqlite"))
    monkeypatch.delenv("ACCELERANDO_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def _run_cli(cmd: str) -> None:
    from typer.testing import CliRunner
    from accelerando import cli
    args = shlex.split(cmd)
    if args[0] == "./run":
        args = ["accelerando", *args[1:]]
    assert args[0] == "accelerando", f"README command {cmd!r}: only `accelerando ...` and `./run ...` can be tested"
    res = CliRunner().invoke(cli.get_app(), args[1:])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, f"{cmd!r} exited {res.exit_code}:\n{res.output}"


@pytest.mark.parametrize("kind, code", _cases())
def test_readme_runs_as_written(kind, code, readme_env):
    if kind == "python":
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
        return
    if code in README_SKIP:
        why, instead = README_SKIP[code]
        if instead is None:
            pytest.skip(f"{code!r} is not run: {why}")
        code = instead
    _run_cli(code)


def test_readme_skip_and_xfail_lists_name_real_commands():
    cmds = {c.values[1] for c in _cases() if c.values[0] == "command"}
    assert set(README_SKIP) <= cmds and set(README_XFAIL) <= cmds, "remove stale entries"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    fenced, out = False, set()
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.add(_slug(line.lstrip("#")))
    return out


@pytest.mark.parametrize("page", ["README.md", "BENCHMARKS.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_links_resolve(page):
    src = ROOT / page
    for target in re.findall(r"\]\(([^)\s]+)\)", src.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (src.parent / file).resolve() if file else src
        assert path.exists(), f"{page}: link to missing {file}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page}: no heading for #{anchor} in {path.name}"


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200, "README.md is the front page: move details to docs/"


def _builder():
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / "docs" / "build_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_zoo_table_is_up_to_date():
    page = ROOT / "docs" / "zoo.md"
    assert page.read_text() == _builder().build(page.read_text()), "run: python docs/build_docs.py"


def test_zoo_table_lists_every_bundled_model_with_its_card_numbers():
    table = _builder().zoo_table()
    for card in (ROOT / "src" / "accelerando" / "zoo" / "models").glob("*/card.json"):
        c = json.loads(card.read_text())
        assert f"`{card.parent.name}`" in table
        assert f"{c['parameters']:,}" in table
