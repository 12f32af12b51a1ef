"""README's reading path is a book: the lessons in an order where none needs a later one.

Read off README's table (the files each row names, in its order), every lesson file must
  - end its docstring with its place: "Lesson N of README's reading path: read after X; next: Y",
    with X and Y the files before and after it on the path,
  - import no lesson that comes after it (module-level imports; the plumbing is not a lesson),
and bert.py, the first, imports nothing of this project but common.py's plumbing.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def reading_path(readme=ROOT / "README.md"):
    """[(lesson number, [files its row names])] in the table's order."""
    rows = []
    for line in readme.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| (\d+) \| [^|]+ \| ([^|]+) \|", line)
        if match:
            files = re.findall(r"`([\w/]+\.py)`", match.group(2))
            rows.append((int(match.group(1)), files))
    return rows


def lesson_files(rows):
    """Every file of the path once, in the order a learner meets them."""
    order = []
    for _, files in rows:
        order += [f for f in files if f not in order]
    return order


def module_name(file):
    return file.removesuffix(".py").replace("/", ".")


def imported_modules(path):
    """Modules a file imports at its top level (import x; from x import y; from pkg import mod)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def place_in_path(path):
    """The docstring's last paragraph, where a lesson says where it stands."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=True) or ""
    return " ".join(doc.strip().split("\n\n")[-1].split())


def test_the_table_is_numbered_in_order_and_names_files_that_exist():
    rows = reading_path()
    assert [n for n, _ in rows] == list(range(1, len(rows) + 1))
    assert len(rows) >= 21
    for n, files in rows:
        assert files, f"lesson {n} names no file"
        for file in files:
            assert (ROOT / file).is_file(), f"lesson {n}: {file} not found"


@pytest.mark.parametrize("file", lesson_files(reading_path()))
def test_each_lesson_says_its_place_as_readme_does(file):
    rows = reading_path()
    order = lesson_files(rows)
    i = order.index(file)
    numbers = [n for n, files in rows if file in files]
    place = place_in_path(ROOT / file)
    said = re.match(r"Lessons? (\d+)(?: and (\d+))?(?:, with [\w/.]+)? of README's reading path",
                    place)
    assert said, f"{file}: the docstring's last paragraph does not give its place: {place!r}"
    assert [int(x) for x in said.groups() if x] == numbers, f"{file}: {place!r}"
    before = "read this first" if i == 0 else f"read after {order[i - 1]}"
    assert before in place, f"{file}: expected '{before}' in {place!r}"
    if i + 1 < len(order):
        assert f"next: {order[i + 1]}" in place, f"{file}: expected 'next: {order[i + 1]}'"
    else:
        assert "next:" not in place, f"{file} is the last lesson"


@pytest.mark.parametrize("file", lesson_files(reading_path()))
def test_no_lesson_imports_a_later_one(file):
    order = lesson_files(reading_path())
    later = {module_name(f) for f in order[order.index(file) + 1:]}
    needed = imported_modules(ROOT / file) & later
    assert not needed, f"{file} imports later lessons: {sorted(needed)}"


def test_bert_py_is_plain_torch_and_common():
    ours = {p.stem for p in ROOT.glob("*.py")} | {"plumbing", "fused_kernels"}
    project_imports = {name.split(".")[0] for name in imported_modules(ROOT / "bert.py")} & ours
    assert project_imports == {"common"}


def test_the_checks_catch_a_forward_import_and_a_wrong_pointer(tmp_path):
    """The helpers above on made-up files: a later lesson imported, a pointer to the wrong file."""
    readme = tmp_path / "README.md"
    readme.write_text("| 1 | a | `a.py`: `f` | x | y |\n| 2 | b | `b.py`: `g` | x | y |\n")
    (tmp_path / "a.py").write_text('"""A.\n\nLesson 1 of README\'s reading path: read this first; '
                                   'next: c.py."""\nimport b\n')
    rows = reading_path(readme)
    assert lesson_files(rows) == ["a.py", "b.py"]
    assert "b" in imported_modules(tmp_path / "a.py")
    assert "next: b.py" not in place_in_path(tmp_path / "a.py")
