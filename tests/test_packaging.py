"""`pip install .` and `pip install -e .` install the libraries `ood_detectors` and `ood_evaluation` alone,
importable from any folder.

The pipeline's top-level names (pipeline, models, dataloaders, errors, registry, main, ...) are generic and run
from the checkout, beside configs/: none of them may land in site-packages or be imported by the libraries.
Everything here is offline: builds use this interpreter's setuptools (--no-build-isolation) and pip never
reads an index (--no-index, --no-deps).
"""
from __future__ import annotations

import ast
import email.parser
import json
import os
import re
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "ood_detectors"
LIBRARIES = (LIBRARY, "ood_evaluation")  # the distribution's packages
# the repository's other top-level modules and packages: main, errors, registry, pipeline, models, tests, ...
OTHER_TOP_LEVEL = sorted(({path.stem for path in REPO.glob("*.py")}
                          | {path.parent.name for path in REPO.glob("*/*.py")}) - set(LIBRARIES))
# what the libraries import (top-level name) -> the distribution pyproject.toml declares for it
DISTRIBUTIONS = {"torch": "torch", "numpy": "numpy", "sklearn": "scikit-learn", "faiss": "faiss-cpu"}
PIP = ["-m", "pip", "--disable-pip-version-check", "--no-input"]
PIP_OFFLINE = ["--no-deps", "--no-build-isolation", "--no-index"]


def offline_env() -> dict[str, str]:
    """This environment without PYTHONPATH or a user's pip configuration."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHONPATH", "PYTHONHOME") and not name.startswith("PIP_")}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PYTHONNOUSERSITE": "1"}


def run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def installed_version(distribution: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in re.findall(r"\d+", version(distribution))[:2])
    except PackageNotFoundError:
        return ()


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A copy of the checkout's files (tracked and untracked-but-not-ignored), to build from: setuptools writes
    build/ and *.egg-info/ beside pyproject.toml, and a stale build/ in the checkout would leak into the wheel."""
    if installed_version("setuptools") < (64,):
        pytest.skip("building needs setuptools>=64 in this interpreter (pip install 'setuptools>=64')")
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the source tree to build is listed with git: needs a git checkout")
    copy = tmp_path_factory.mktemp("source")
    for name in listing.decode().split("\0"):
        if name and (REPO / name).is_file():  # a tracked file deleted in the working tree is left out
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def wheel(source_tree, tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, built from the copy."""
    folder = tmp_path_factory.mktemp("wheel")
    run([sys.executable, *PIP, "wheel", *PIP_OFFLINE, "-w", str(folder), str(source_tree)], cwd=folder)
    (built,) = folder.glob("*.whl")
    return built


def third_party_imports(libraries: tuple[str, ...] = LIBRARIES) -> dict[str, bool]:
    """Top-level names that the libraries' modules import from outside the standard library and themselves, each
    with whether some file imports it at module level (a dependency) rather than only inside a function
    (optional)."""
    found: dict[str, bool] = {}
    for path in sorted(path for library in libraries for path in (REPO / library).glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - set(LIBRARIES):
                found[top] = found.get(top, False) or node in tree.body
    return found


def test_wheel_holds_the_library_alone(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = {name for name in names if name.split("/")[0].endswith(".dist-info")}
    assert names - dist_info == {f"{library}/{path.name}" for library in LIBRARIES
                                 for path in (REPO / library).glob("*.py")}
    (top_level,) = [name for name in dist_info if name.endswith("/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == sorted(LIBRARIES)


def test_wheel_declares_what_the_library_imports(wheel):
    """Required: what some module imports at its top (torch, numpy, sklearn); the `faiss` extra: what is
    imported only where used. The pipeline's own pins (torchvision, pyyaml, matplotlib, ...) stay out."""
    archive = zipfile.ZipFile(wheel)
    (metadata_name,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
    metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    required, extras = set(), {}
    for requirement in metadata.get_all("Requires-Dist"):
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group().lower()
        extra = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", requirement)
        (extras.setdefault(extra.group(1), set()) if extra else required).add(name)

    imports = third_party_imports()
    assert not set(imports) & set(OTHER_TOP_LEVEL), "the libraries must import nothing else from the repository"
    assert set(imports) <= set(DISTRIBUTIONS), \
        f"the libraries import {sorted(set(imports) - set(DISTRIBUTIONS))}: declare it in pyproject.toml"
    assert "torch" not in third_party_imports(("ood_evaluation",))
    assert required == {DISTRIBUTIONS[name] for name, at_top in imports.items() if at_top}
    assert extras == {"faiss": {DISTRIBUTIONS["faiss"]}} and imports.get("faiss") is False
    assert metadata["Requires-Python"].startswith(">=3.10")  # `X | Y` evaluated at import


# Run in the new environment, from an empty folder, without PYTHONPATH: the README's example, and what came along.
USE_THE_LIBRARY = r"""
import importlib.util, json, sys, sysconfig
from pathlib import Path
import torch
import ood_detectors
from ood_detectors import create_detector

generator = torch.Generator().manual_seed(0)
feas = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=1)
logits = 3 * torch.randn(40, 5, generator=generator)
bank, queries = slice(0, 30), slice(30, 40)
detector = create_detector("nnguide", k=4).fit({"feas": feas[bank], "logits": logits[bank]})
scores = detector.score_samples({"feas": feas[queries], "logits": logits[queries]})
# the README's five lines: mean of the k largest <z, S(x_i) z_i> over the bank, times S(x), S = logsumexp
energy = torch.logsumexp(logits, dim=1)
guidance = (feas[queries] @ (energy[bank, None] * feas[bank]).T).topk(4, dim=1).values.mean(dim=1)
torch.testing.assert_close(scores, guidance * energy[queries])

# the repository, its copy and this environment's own site-packages (not the ones it shares)
site_packages = sysconfig.get_paths()["purelib"]
other_names = json.loads(sys.argv[1])
sources = [Path(path).resolve() for path in json.loads(sys.argv[2]) + [site_packages]]
loaded = sorted(name for name in other_names if name in sys.modules)
def from_sources(spec):
    places = list(spec.submodule_search_locations or []) + [spec.origin or ""]
    return any(Path(place).resolve().is_relative_to(source) for place in places if place for source in sources)
findable = sorted(name for name in other_names if (spec := importlib.util.find_spec(name)) and from_sources(spec))
print(json.dumps({"file": ood_detectors.__file__, "site_packages": site_packages,
                  "loaded": loaded, "findable": findable}))
"""


def new_environment(folder: Path) -> Path:
    """A fresh venv that also sees this interpreter's packages (torch, pip, setuptools), after its own.

    Not `--system-site-packages`: run from a venv, that option shows the base interpreter's packages, not the
    venv's. `site.addsitedir` in a .pth file adds this interpreter's site-packages with their own .pth files.
    """
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    own = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=folder)
               .strip())
    lines = [f"import site; site.addsitedir({path!r})" for path in site.getsitepackages()]
    (own / "_parent_site_packages.pth").write_text("\n".join(lines) + "\n")
    return python


def install_and_use(editable: bool, source_tree: Path, folder: Path) -> tuple[set[str], dict, Path]:
    """A fresh environment with the library installed (`pip install .`, or `-e .`), then USE_THE_LIBRARY run in
    it from an empty folder: (what the install left in the checkout, the script's report, where ood_detectors
    must come from)."""
    python = new_environment(folder / "venv")
    before = {path.name for path in REPO.iterdir()}
    # `pip install -e .` maps the checkout's ood_detectors; `pip install .` is built from the copy (see source_tree)
    target = ["-e", str(REPO)] if editable else [str(source_tree)]
    run([str(python), *PIP, "install", *PIP_OFFLINE, *target], cwd=folder)
    leftovers = {name for name in {path.name for path in REPO.iterdir()} - before
                 if name == "build" or name.endswith(".egg-info")}

    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    report = json.loads(run([str(python), "-c", USE_THE_LIBRARY, json.dumps(OTHER_TOP_LEVEL),
                             json.dumps([str(REPO), str(source_tree)])], cwd=elsewhere).splitlines()[-1])
    return leftovers, report, REPO if editable else Path(report["site_packages"])


@pytest.fixture(scope="module")
def installs(request, source_tree, tmp_path_factory) -> dict[bool, Future]:
    """install_and_use for each install kind this session selected, side by side (each is mostly one process
    at a time: pip, then a fresh interpreter importing torch); each test waits for its own."""
    selected = [item.callspec.params["editable"] for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {editable: pool.submit(install_and_use, editable, source_tree,
                                     tmp_path_factory.mktemp("editable" if editable else "install"))
               for editable in selected}


@pytest.mark.slow  # a venv, an install, a fresh interpreter importing torch: 6-16 s each on 2 cores
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_installed_library_imports_from_anywhere_without_the_pipeline(editable, installs):
    leftovers, report, expected_home = installs[editable].result(timeout=600)
    assert not leftovers, f"the install wrote {sorted(leftovers)} into the checkout"
    assert Path(report["file"]).resolve() == (expected_home / LIBRARY / "__init__.py").resolve()
    assert report["loaded"] == [], "importing and using ood_detectors loaded the repository's other modules"
    assert report["findable"] == [], "the install put the repository's other top-level names on the import path"
