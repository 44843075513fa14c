"""The built wheel: it holds every module of the source tree and works without the source tree.

An editable install reads the source directories directly and hides a package missing from
``pyproject.toml``; a wheel installed from PyPI does not (the engine would die after loading weights
on the first missing import). The slow test builds the wheel with the project's own interpreter
(``pip wheel --no-deps --no-build-isolation``), installs it into a fresh venv that sees the project
venv's third-party packages but not its editable ``sglang_depthkv``, imports every module from
there, and starts SGLang's argument parsing with the plugin loaded by SGLang's own loader.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
# source directory -> installed package name (pyproject.toml's package-dir)
MAPPING = {"sglang_depthkv": "sglang_depthkv", "kernels": "sglang_depthkv.kernels",
           "patches": "sglang_depthkv.patches"}
BUILD_INPUTS = ("pyproject.toml", "README.md", *MAPPING)


def _walk(src_dir: Path):
    """Sub-directories of ``src_dir`` (itself included) and their ``.py`` files, no caches."""
    for dirpath, dirnames, filenames in os.walk(src_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info"))
        yield Path(dirpath), sorted(f for f in filenames if f.endswith(".py"))


def _dotted(root: Path, path: Path) -> str:
    """Installed dotted name of a source directory or ``.py`` file under ``root``."""
    rel = path.relative_to(root).with_suffix("") if path.suffix == ".py" else path.relative_to(root)
    top, *rest = rel.parts
    name = ".".join([MAPPING[top], *rest])
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def source_packages(root: Path = ROOT) -> set:
    """Installed names of the source tree's directories that hold Python code."""
    return {_dotted(root, d) for top in MAPPING for d, files in _walk(root / top) if files}


def source_modules(root: Path = ROOT) -> set:
    """Installed dotted names of every ``.py`` file under ``sglang_depthkv/``, ``kernels/``, ``patches/``."""
    return {_dotted(root, d / f) for top in MAPPING for d, files in _walk(root / top) for f in files}


def wheel_modules(wheel: Path) -> set:
    names = set()
    for n in zipfile.ZipFile(wheel).namelist():
        if n.endswith(".py"):
            dotted = n[: -len(".py")].replace("/", ".")
            names.add(dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted)
    return names


def test_pyproject_lists_every_package():
    """Fast check of the hand-kept package list: every source directory with Python code is a
    package (has ``__init__.py``) and is listed, with the source -> installed mapping."""
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {v: k for k, v in MAPPING.items()}
    no_init = [str(d.relative_to(ROOT)) for top in MAPPING for d, files in _walk(ROOT / top)
               if files and "__init__.py" not in files]
    assert no_init == [], f"directories with Python code but no __init__.py: {no_init}"
    listed = set(cfg["packages"])
    assert listed == source_packages(), (
        f"pyproject.toml [tool.setuptools] packages: missing {sorted(source_packages() - listed)}, "
        f"extra {sorted(listed - source_packages())}")


def _project_site() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _fresh_venv(tmp: Path) -> Path:
    """A venv without pip whose ``sys.path`` ends with a filtered view of the project venv's
    site-packages: every entry there except this project's editable install (its finder, its
    ``.pth`` and its ``dist-info``, which would add a second ``depthkv`` entry point)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    view = tmp / "project-site"
    view.mkdir()
    for entry in _project_site().iterdir():
        n = entry.name
        if n.startswith("__editable__") or (n.startswith("sglang_depthkv") and n.endswith((".dist-info", ".egg-link"))):
            continue
        (view / n).symlink_to(entry)
    # site.addsitedir also runs the view's .pth files (e.g. the CPU environment's import shims).
    (site / "zz_project_site.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    return py


CHECK = textwrap.dedent('''
    import importlib, json, pkgutil, sys
    from importlib.metadata import distribution, entry_points
    from pathlib import Path

    venv, model = Path(sys.argv[1]).resolve(), sys.argv[2]
    import sglang_depthkv
    assert Path(sglang_depthkv.__file__).resolve().is_relative_to(venv), sglang_depthkv.__file__
    names = sorted(m.name for m in pkgutil.walk_packages(sglang_depthkv.__path__, "sglang_depthkv."))
    for name in names:
        mod = importlib.import_module(name)
        assert Path(mod.__file__).resolve().is_relative_to(venv), (name, mod.__file__)
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "depthkv"]
    assert len(eps) == 1, eps
    files = distribution("sglang-depthkv").files
    data = sorted(str(f) for f in files if str(f).endswith(".txt.gz"))

    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang_depthkv.patches.registry import missing_hooks
    assert missing_hooks() == [], missing_hooks()
    from sglang.srt.server_args import prepare_server_args
    sa = prepare_server_args(["--model-path", model, "--device", "cpu", "--skip-tokenizer-init",
                              "--kv-policy", "snapkv", "--kv-budget", "0.3"])
    s = sa._depthkv_settings
    print("RESULT " + json.dumps({"modules": ["sglang_depthkv", *names], "data": data,
                                  "settings": [s.policy, s.budget], "backend": sa.attention_backend}))
''')


@pytest.mark.slow  # about a minute on two shared cores
def test_wheel_installs_and_runs(tmp_path):
    # Build from a copy of the build inputs: a build/ left in the checkout by an earlier build would
    # put stale modules into the wheel, and the copy keeps concurrent builds apart.
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(p, src / name)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    env.pop("PYTHONPATH", None)
    whl_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(whl_dir), str(src)], check=True, cwd=tmp_path, env=env)
    (wheel,) = whl_dir.glob("sglang_depthkv-*.whl")

    expected = source_modules()
    got = wheel_modules(wheel)
    assert got == expected, f"wheel lacks {sorted(expected - got)}, has extra {sorted(got - expected)}"

    py = _fresh_venv(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    str(wheel)], check=True, cwd=tmp_path, env=env)

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import save_tiny_model

    (tmp_path / "llama").mkdir()
    model = save_tiny_model(tmp_path / "llama", "llama", seed=0)
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path
    r = subprocess.run([str(py), "-c", CHECK, str(py.parents[1]), str(model)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert set(result["modules"]) == expected
    data = sorted(p.name for p in (ROOT / "sglang_depthkv" / "data").glob("*.txt.gz"))
    assert data and [Path(f).name for f in result["data"]] == data
    assert result["settings"] == ["snapkv", 0.3]
    assert result["backend"] == "torch_native"
