"""walkthrough.ipynb, lessons 1-2 (bert.py), 12 (train_lora.py) and 17 (shapley.py) on a tiny
model: every code cell runs offline (no AG News rows, no MiniLM package, nothing downloaded), and
the outputs the notebook keeps, which a forge shows beside the code, are what its cells print now.

No Jupyter here (the project pins its dependencies, and jupyter, nbformat and nbclient are none of
them): the runner below reads the notebook's JSON and runs its code cells in order in one shared
namespace, from the project's root, with torch on one thread and each cell's stdout captured. It
keeps stdout only, so the cells print all they show: none may end in a bare expression, whose
value Jupyter would show and this runner would not keep.

    python tests/test_notebook.py --write   # run the notebook and keep what it prints now
"""
import ast
import contextlib
import io
import json
import linecache
import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "walkthrough.ipynb"
# Each lesson's section: a markdown heading that names its file.
LESSON_FILES = ["bert.py", "train_lora.py", "shapley.py"]


def load(path=NOTEBOOK):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def joined(text):
    """nbformat stores a cell's source and an output's text as one string or as a list of lines."""
    return text if isinstance(text, str) else "".join(text)


def source_of(cell):
    return joined(cell["source"])


def code_cells(notebook):
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def kept_stdout(cell):
    """What the notebook shows under a code cell: its stdout stream outputs, joined."""
    return "".join(joined(output["text"]) for output in cell.get("outputs", [])
                   if output["output_type"] == "stream" and output["name"] == "stdout")


@contextlib.contextmanager
def at_project_root():
    """cwd = the project's root and its modules importable, as in a notebook started there; torch
    on one thread, so that no sum is split otherwise on a machine with more cores (the notebook
    rounds what it prints, so in Jupyter, on every core, it prints the same); all as it was
    afterwards, torch's random state too (the cells seed it)."""
    cwd, threads, path = os.getcwd(), torch.get_num_threads(), list(sys.path)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        torch.set_num_threads(threads)


def run(notebook):
    """Run the code cells in order in one namespace. Returns each code cell's stdout (a list of
    str). A traceback names the cell and shows its line."""
    namespace = {"__name__": "__main__"}
    printed = []
    with at_project_root():
        for number, cell in enumerate(code_cells(notebook), start=1):
            name = f"<{NOTEBOOK.name} code cell {number}>"
            source = source_of(cell)
            linecache.cache[name] = (len(source), None, source.splitlines(keepends=True), name)
            code = compile(source, name, "exec")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
            printed.append(out.getvalue())
    return printed


def stdout_outputs(text):
    """nbformat 4's outputs for a cell that printed `text`: one stdout stream, or none."""
    if not text:
        return []
    return [{"name": "stdout", "output_type": "stream", "text": text.splitlines(keepends=True)}]


def with_outputs(notebook, printed):
    """A copy of the notebook keeping `printed` (one str per code cell) as its outputs, the code
    cells numbered 1, 2, ... as one run from the top numbers them."""
    notebook = json.loads(json.dumps(notebook))
    for number, (cell, text) in enumerate(zip(code_cells(notebook), printed), start=1):
        cell["execution_count"] = number
        cell["outputs"] = stdout_outputs(text)
    return notebook


def save(notebook, path=NOTEBOOK):
    """As Jupyter writes a notebook (indent 1, sorted keys), so saving it there changes little."""
    Path(path).write_text(json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False)
                          + "\n", encoding="utf-8")


def stale_cells(notebook, printed):
    """The numbers (from 1) of the code cells whose kept stdout is not what they printed."""
    return [number for number, (cell, text) in enumerate(zip(code_cells(notebook), printed),
                                                        start=1)
            if kept_stdout(cell) != text]


def is_print(node):
    """A print(...) call, whose value (None) Jupyter does not show."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "print")


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def printed():
    """One fresh run of the notebook, shared by the tests below."""
    return run(load())


def test_the_walkthrough_runs_and_its_kept_outputs_are_what_it_prints(printed):
    """Every code cell runs (the fixture: no exception, no rows, no MiniLM, no download) and
    prints exactly the stdout the notebook keeps under it, so what a forge shows is true."""
    notebook = load()
    assert len(printed) == len(code_cells(notebook))
    stale = stale_cells(notebook, printed)
    assert not stale, (f"walkthrough.ipynb code cells {stale} keep outputs other than what they "
                       f"print now; if the change is meant, refresh them: "
                       f"python tests/test_notebook.py --write\n"
                       + "\n".join(f"--- cell {n} kept:\n{kept_stdout(code_cells(notebook)[n - 1])}"
                                   f"--- cell {n} printed:\n{printed[n - 1]}" for n in stale))
    # the cells are numbered as one run from the top numbers them
    assert [cell["execution_count"] for cell in code_cells(notebook)] == list(
        range(1, len(printed) + 1))


def test_an_edited_kept_output_is_caught(printed):
    """The check above can fail: one changed digit in one kept output, and that cell is named."""
    notebook = with_outputs(load(), printed)
    assert stale_cells(notebook, printed) == []
    cell = code_cells(notebook)[-1]
    text = kept_stdout(cell)
    digit = re.search(r"\d", text)
    edited = text[:digit.start()] + str((int(digit.group()) + 1) % 10) + text[digit.end():]
    cell["outputs"] = stdout_outputs(edited)
    assert stale_cells(notebook, printed) == [len(printed)]


def test_the_three_lessons_have_sections_and_every_code_cell_keeps_outputs():
    """A markdown heading names each lesson's file, in reading order; every code cell keeps what it
    printed (a reader on a forge sees the outputs, not a run) and ends in a statement, not in an
    expression whose value Jupyter would show and the runner would not keep."""
    notebook = load()
    assert notebook["nbformat"] == 4
    headings = [line for cell in notebook["cells"] if cell["cell_type"] == "markdown"
                for line in source_of(cell).splitlines() if line.startswith("#")]
    places = [next((i for i, heading in enumerate(headings) if f"`{name}`" in heading), None)
              for name in LESSON_FILES]
    assert None not in places, f"no heading names {LESSON_FILES[places.index(None)]}: {headings}"
    assert places == sorted(places), headings
    for number, cell in enumerate(code_cells(notebook), start=1):
        assert kept_stdout(cell).strip(), f"code cell {number} keeps no output"
        assert all(output["output_type"] == "stream" and output["name"] == "stdout"
                   for output in cell["outputs"]), f"code cell {number}: only stdout is kept"
        last = ast.parse(source_of(cell)).body[-1]
        assert not isinstance(last, ast.Expr) or is_print(last.value), (
            f"code cell {number} ends in an expression: Jupyter would show its value")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python {Path(__file__).relative_to(ROOT)} --write   "
                 f"(keep in {NOTEBOOK.name} what its cells print now); the tests: "
                 f"python -m pytest -q tests/test_notebook.py")
    notebook = load()
    save(with_outputs(notebook, run(notebook)))
    print(f"{NOTEBOOK.name}: kept the outputs of {len(code_cells(notebook))} code cells")
