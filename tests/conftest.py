"""Shared fixtures: run the tool, find real peers (DCMTK), make trees of test data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "dicom_sar.py"
sys.path.insert(0, str(ROOT))
IN_CI = os.environ.get("CI") == "true"
FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def need(program: str) -> str:
    """Path of a real peer program; missing is a failure in CI and a skip elsewhere."""
    path = shutil.which(program)
    if path is None:
        message = f"{program} is not installed (apt-get install dcmtk dicom3tools orthanc fish)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclasses.dataclass
class Run:
    """A finished run of the tool."""

    code: int
    out: str
    err: str
    cwd: Path

    def log(self, name: str = "dicom_sar.log") -> str:
        """Text of a log file the run wrote into its cwd."""
        path = self.cwd / name
        return path.read_text(encoding="utf-8") if path.exists() else ""


def run_tool(*args: str | Path, cwd: Path, python: str | None = None,
             timeout: float = 600, env: dict[str, str] | None = None,
             prefix: list[str] | None = None) -> Run:
    """Run dicom_sar.py in cwd with the test interpreter (prefix: e.g. ip netns exec NS)."""
    cmd = [*(prefix or []), python or sys.executable, str(TOOL), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return Run(proc.returncode, proc.stdout.decode("utf-8", "surrogateescape"),
               proc.stderr.decode("utf-8", "replace"), cwd)


def dcmdump(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """Run DCMTK's dcmdump (the oracle)."""
    return subprocess.run([need("dcmdump"), *map(str, args)], capture_output=True)


def squeeze(text: str) -> list[str]:
    """Lines with runs of spaces folded (dcmdump pads; the spec allows other padding)."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def pydicom_files() -> list[Path]:
    """pydicom's bundled DICOM test files (test data and character set samples)."""
    skip = (".txt", ".json", ".gz", ".icc", ".dump", ".py")
    return sorted(Path(f) for f in get_testdata_files() + get_charset_files()
                  if not f.endswith(skip))


def dcmdump_reads(path: Path) -> bool:
    """True when dcmdump reads the file without any error or warning."""
    proc = dcmdump("-q", path)
    return proc.returncode == 0 and not proc.stderr.strip()


@pytest.fixture(scope="session")
def readable_pydicom_files() -> list[Path]:
    """pydicom's test files that dcmdump reads cleanly (the oracle's own domain)."""
    need("dcmdump")
    return [p for p in pydicom_files() if dcmdump_reads(p)]


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree from --generate with every preset (made once per session)."""
    base = tmp_path_factory.mktemp("generated")
    names = run_tool("--list-scenarios", cwd=base).out.split("\n")
    args = [x for line in names if line.strip() for x in ("--scenario", line.split()[0])]
    run = run_tool("--generate", "--output", base / "tree", "--seed", "11", "-j", "2",
                   "--no-progress", *args, cwd=base)
    assert run.code == 0, run.err
    return base / "tree"


@pytest.fixture(scope="session")
def manifest(generated: Path) -> dict:
    """The generated tree's manifest.json."""
    return json.loads((generated / "manifest.json").read_text())


def instances(manifest: dict, **match: object) -> list[dict]:
    """Manifest entries whose fields equal the given values."""
    return [e for e in manifest["instances"] if all(e.get(k) == v for k, v in match.items())]


@pytest.fixture
def copy_of(tmp_path: Path):
    """Copy files (or manifest entries of a generated tree) into a fresh input dir."""

    def make(*sources: Path, names: list[str] | None = None) -> Path:
        target = tmp_path / "in"
        target.mkdir(exist_ok=True)
        for i, src in enumerate(sources):
            name = names[i] if names else src.name
            shutil.copy2(src, target / name)
        return target

    return make


def read(path: Path) -> pydicom.Dataset:
    """Read a file with pydicom, leniently."""
    return pydicom.dcmread(path, force=True)
