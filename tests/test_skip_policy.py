"""The run's skip policy (tests/conftest.py), on a throw-away suite run in a subprocess: every skip is
counted by reason in one closing line, and ``FACEGATE_REQUIRE_ALL=1`` turns each kind of skip into a
failure (``pytest.skip``, ``importorskip`` at import, a ``skipif`` mark, a skipping fixture), except the
``hardware`` tests, which are skipped by design."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO

SUITE = {
    "test_mixed.py": """
        import pytest

        @pytest.fixture()
        def data():
            pytest.skip("data set absent")

        def test_runs():
            assert True

        def test_skips_itself():
            pytest.skip("no camera here")

        @pytest.mark.skipif(True, reason="needs mosquitto")
        def test_marked():
            assert False

        def test_fixture_skips(data):
            assert False

        @pytest.mark.hardware
        def test_on_a_pi():
            assert False
    """,
    "test_missing_module.py": """
        import pytest

        pytest.importorskip("a_module_that_is_not_installed", reason="optional extra absent")

        def test_never():
            assert False
    """,
}


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    for name, text in SUITE.items():
        (tmp_path / name).write_text(textwrap.dedent(text), encoding="utf-8")
    args = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
            "-o", "addopts=", "-o", "markers=hardware: real hardware", "--rootdir", str(tmp_path),
            str(tmp_path)]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_REQUIRE")}
    environment["PYTHONPATH"] = str(REPO) + os.pathsep + environment.get("PYTHONPATH", "")
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**environment, **env})


def test_skips_are_counted_by_reason_in_one_line(tmp_path: Path) -> None:
    run = _run(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("facegate skips:")]
    assert line.startswith("facegate skips: 5 (")
    for reason in ("data set absent", "no camera here", "needs mosquitto", "optional extra absent",
                   "hardware test"):
        assert f"1 {reason}" in line, line


def test_require_all_turns_every_skip_but_hardware_into_a_failure(tmp_path: Path) -> None:
    run = _run(tmp_path, FACEGATE_REQUIRE_ALL="1")
    assert run.returncode == 1, run.stdout[-3000:]
    assert "FACEGATE_REQUIRE_ALL=1: 4 skips failed the run:" in run.stdout
    for reason in ("data set absent", "no camera here", "needs mosquitto", "optional extra absent"):
        assert reason in run.stdout
    assert "test_on_a_pi: " not in run.stdout  # the hardware test stays a plain skip
    assert "facegate skips: 1 (1 hardware test" in run.stdout
    # A skip in the test body fails it; one in setup (a mark, a fixture) is an error; a skipped module
    # stays listed as skipped but fails the run's exit status.
    assert "1 failed, 1 passed, 2 skipped, 2 errors" in run.stdout
