"""The wheel ships the manifest, the schema and the CLI, with the console script."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_manifest_schema_cli_and_entry_point(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(
        REPO, src, symlinks=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests"),
    )
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = out.glob("snzoo-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("snzoo/weights_manifest.json") == (REPO / "weights_manifest.json").read_bytes()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "snzoo/manifest.schema.json" in names and "snzoo/data/imagenet1k_wnids.txt" in names
    assert {"snzoo_cli/__init__.py", "snzoo_cli/main.py", "snzoo/nn/functional.py", "snzoo/models/resnet.py"} <= names
    assert not any(n.startswith("cli/") for n in names)  # no bare top-level `cli` package
    assert "snzoo = snzoo_cli.main:main" in entry_points
    py_files = {p.relative_to(REPO).as_posix() for p in (REPO / "snzoo").rglob("*.py")}
    assert py_files <= names
