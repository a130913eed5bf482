"""Builds the C++ unit tests (cpp/tests/test_*.cpp) with CMake into a temporary directory and runs
them through ctest, so `pytest` covers the C++ core without Python in the loop."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_cpp_unit_tests_pass(tmp_path: Path) -> None:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2")
    build = tmp_path / "build"

    def run(*args: str) -> None:
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"

    run(cmake, "-S", str(REPO), "-B", str(build), "-DPDSERVE_BUILD_TESTS=ON", *generator)
    run(cmake, "--build", str(build), "-j2")
    ctest = shutil.which("ctest") or str(Path(cmake).with_name("ctest"))
    run(ctest, "--test-dir", str(build), "--output-on-failure", "-j2")
