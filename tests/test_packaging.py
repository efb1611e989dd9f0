"""The wheel ships the manifest, the schema, the CLI with its console script, the kernel source and the trained
weights; installed into a fresh environment, away from the source checkout, it evaluates a shipped entry and
builds the kernel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from snzoo import zoo

REPO = Path(__file__).resolve().parents[1]
KERNEL_SOURCES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "snzoo" / "nn" / "csrc").iterdir()
                        if p.suffix in (".cpp", ".h"))
SHIPPED_WEIGHTS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "snzoo" / "pretrained").glob("*.safetensors"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """snzoo's wheel, built from a copy of the source tree without its tests, environments and build outputs."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        REPO, src, symlinks=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests"),
    )
    out = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (built,) = out.glob("snzoo-*.whl")
    return built


def test_wheel_contains_manifest_schema_cli_and_entry_point(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("snzoo/weights_manifest.json") == (REPO / "weights_manifest.json").read_bytes()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "snzoo/zoo/manifest.schema.json" in names and "snzoo/data/imagenet1k_wnids.txt" in names
    assert {"snzoo_cli/__init__.py", "snzoo_cli/main.py", "snzoo/nn/functional.py", "snzoo/models/resnet.py"} <= names
    assert not any(n.startswith("cli/") for n in names)  # no bare top-level `cli` package
    assert "snzoo = snzoo_cli.main:main" in entry_points
    py_files = {p.relative_to(REPO).as_posix() for p in (REPO / "snzoo").rglob("*.py")}
    assert py_files <= names


def test_wheel_ships_the_kernel_source_and_every_packaged_weights_file_byte_for_byte(wheel):
    packaged = sorted(s.url.removeprefix("package:") for e in zoo.load_manifest().entries.values()
                      for s in e.sources if s.kind == "package")
    # Every `package:` source of the manifest is a file of the checkout, so the list below is the complete one.
    assert packaged and sorted(f"snzoo/{p}" for p in packaged) == SHIPPED_WEIGHTS
    assert KERNEL_SOURCES == ["snzoo/nn/csrc/sn_grad_passes.h", "snzoo/nn/csrc/sn_mixing.h",
                              "snzoo/nn/csrc/sn_moments.h", "snzoo/nn/csrc/sn_passes.h",
                              "snzoo/nn/csrc/sn_row_moments.h", "snzoo/nn/csrc/switch_norm_cpu.cpp"]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = sorted(set(KERNEL_SOURCES + SHIPPED_WEIGHTS) - names)
        assert not missing, f"the wheel lacks {missing}"
        for path in KERNEL_SOURCES + SHIPPED_WEIGHTS:
            assert zf.read(path) == (REPO / path).read_bytes(), path


def _fresh_environment(root: Path) -> Path:
    """A new virtual environment at root that sees this environment's third-party packages (torch and the rest,
    through a .pth file, so nothing is reinstalled) but not its editable snzoo; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True,
                   timeout=120)
    python = root / "bin" / "python"
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60).stdout.strip())
    # A path line of a .pth file joins sys.path, but .pth files inside that folder are not processed: the
    # editable install's finder there stays inactive, so `import snzoo` can only find the installed wheel.
    (site_packages / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_wheel_installed_in_a_fresh_environment_evaluates_a_shipped_entry_and_builds_the_kernel(wheel, tmp_path):
    venv = tmp_path / "venv"
    python = _fresh_environment(venv)
    work = tmp_path / "elsewhere"  # the cwd: the source checkout is not on sys.path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SNZOO_CPU_KERNEL", "PIP_FIND_LINKS")}
    env.update(SNZOO_CACHE=str(tmp_path / "weights-cache"), SNZOO_KERNEL_CACHE=str(tmp_path / "kernels"),
               SNZOO_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
        out = subprocess.run(list(command), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{' '.join(command)} failed:\n{out.stderr[-3000:]}"
        return out

    # pip from this environment installs into the fresh one (`--python`); --no-index: nothing is downloaded.
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
        str(wheel))
    installed = json.loads(run(str(python), "-c", (
        "import json, snzoo, snzoo_cli, snzoo.nn.cpu_kernels as k; "
        "print(json.dumps({'snzoo': snzoo.__file__, 'cli': snzoo_cli.__file__, 'kernel_source': str(k.SOURCE)}))")).stdout)
    print(f"snzoo imported from {installed['snzoo']}")
    for module, path in installed.items():
        assert Path(path).resolve().is_relative_to(venv.resolve()), f"{module} came from {path}, not the fresh venv"

    snzoo = str(venv / "bin" / "snzoo")  # the console script the wheel installed
    built = run(snzoo, "build-kernel", timeout=600).stdout.strip()
    assert built.startswith("SN CPU kernel: "), built
    library = Path(built.removeprefix("SN CPU kernel: "))
    assert library.is_file() and library.resolve().is_relative_to((tmp_path / "kernels").resolve()), built

    # The default SN entry's weights from the installed package, fetched into an empty cache, on the subset
    # whose numbers the manifest publishes (its eval-mode SN layers run the kernel just built).
    entry = zoo.get_entry("resnet20_sn")
    (subset_key,) = [k for k in entry.metrics if k.startswith("fashion-mnist-test-first")]
    limit = int(subset_key.rsplit("first", 1)[1])
    evaluated = run(snzoo, "eval", entry.name, "--data", "fashion-mnist", "--limit", str(limit), "-j", "0",
                    "--json", "--quiet")
    assert "could not build the SN CPU kernel" not in evaluated.stderr, evaluated.stderr
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [library.parent.name]  # the same build, reused
    result = json.loads(evaluated.stdout)
    published = entry.metrics[subset_key]
    assert result["n"] == limit
    assert (round(result["top1"], 2), round(result["top5"], 2)) == (published.top1, published.top5), result
    assert result["checkpoint_sha256"] == entry.sources[0].sha256


def test_every_package_is_in_the_wheel_list():
    """A package missing from setup.cfg's `packages` is missing from the installed snzoo."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "snzoo").rglob("__init__.py")}
    assert found - listed == set()
