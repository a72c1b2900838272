"""Shared fixtures and the run's skip policy: ../shared, a real broker, the project's built models.

- The broker is :class:`server.broker.LocalBroker`, the demo's: mosquitto when it is on PATH, else the
  embedded amqtt (``FACEGATE_BROKER=amqtt`` forces it, ``=mosquitto`` requires mosquitto).
- Tests using a broker fixture are marked ``broker``: CI runs ``-m broker`` again with
  ``FACEGATE_BROKER=amqtt``, and once more with CPU and disk load beside it.
- Tests marked ``hardware`` are skipped unless ``FACEGATE_HARDWARE=1``.
- ``FACEGATE_REQUIRE_ALL=1`` (CI) turns every other skip into a failure: ``pytest.skip``,
  ``importorskip`` and skip marks alike, in tests, fixtures and at collection.
- The run ends with one line counting the skips by reason.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.terminal import TerminalReporter

from server.broker import LocalBroker, default_kind, free_port, mosquitto_binary, wait_port
from server.db.cluster import LocalPostgres
from server.db.cluster import unavailable_reason as pg_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared"))
REQUIRE_ALL = os.environ.get("FACEGATE_REQUIRE_ALL", "") == "1"
HARDWARE = os.environ.get("FACEGATE_HARDWARE", "") == "1"
HARDWARE_REASON = "hardware test (set FACEGATE_HARDWARE=1 on a Pi with its camera and relay)"
BROKER_FIXTURES = {"mosquitto", "forgetful_broker"}

# The tests' broker is the demo's: one implementation (server.broker); the old names stay importable.
Broker = LocalBroker
__all__ = ["REPO", "SHARED", "Broker", "free_port", "wait_port"]

_skips: Counter[str] = Counter()
_refused: list[str] = []
# Evaluation embeddings of test images are cached with the other slow test inputs, not in ~/.cache.
os.environ.setdefault("FACEGATE_EVAL_CACHE", str(Path(os.environ.get(
    "FACEGATE_TEST_CACHE", Path(os.environ.get("TMPDIR", "/tmp")) / "facegate-test-cache")) / "eval"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which broker and which shared data the run uses, and whether skips fail it."""
    kind = default_kind()
    broker = f"mosquitto {mosquitto_binary()}" if kind == "mosquitto" else (
        "embedded amqtt (" + ("FACEGATE_BROKER=amqtt" if mosquitto_binary() else "mosquitto not on PATH")
        + ")")
    return [
        f"facegate: shared data {'at ' + str(SHARED) if SHARED.is_dir() else 'ABSENT (tests skip)'}",
        f"facegate: broker {broker}",
        f"facegate: skips {'FAIL the run (FACEGATE_REQUIRE_ALL=1)' if REQUIRE_ALL else 'allowed'}",
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the local broker ``broker`` (CI runs them once more on the embedded
    one); skip the hardware-marked tests unless FACEGATE_HARDWARE=1."""
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)
        if not HARDWARE and item.get_closest_marker("hardware") is not None:
            item.add_marker(pytest.mark.skip(reason=HARDWARE_REASON))


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    reason = reason.removeprefix("Skipped: ").strip()
    return reason.splitlines()[0] if reason else "no reason given"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Count each skip by reason; under FACEGATE_REQUIRE_ALL=1 report it as a failure (hardware aside)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if REQUIRE_ALL and item.get_closest_marker("hardware") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped, but FACEGATE_REQUIRE_ALL=1 forbids skips: {reason}"
        _refused.append(f"{item.nodeid}: {reason}")
        return
    _skips[reason] += 1


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module skipped at collection (``importorskip`` at import) counts, and fails under REQUIRE_ALL."""
    if not report.skipped:
        return
    reason = _skip_reason(report)
    if REQUIRE_ALL:
        _refused.append(f"{report.nodeid}: {reason}")
    else:
        _skips[reason] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under FACEGATE_REQUIRE_ALL=1 a run with any skip (a skipped module included) fails."""
    if _refused and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """End with one line counting the skips by reason (and any skip FACEGATE_REQUIRE_ALL refused)."""
    if _refused:
        terminalreporter.write_line(f"FACEGATE_REQUIRE_ALL=1: {len(_refused)} skips failed the run:",
                                    red=True)
        for line in _refused:
            terminalreporter.write_line(f"  {line}", red=True)
    total = sum(_skips.values())
    counts = "; ".join(f"{n} {reason}" for reason, n in _skips.most_common())
    terminalreporter.write_line(f"facegate skips: {total}" + (f" ({counts})" if counts else ""))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder; skips the test when it is absent (a user's fresh clone)."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared not present at {SHARED}")
    return SHARED


@pytest.fixture()
def mosquitto(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalBroker]:
    """A real broker on a free loopback port: mosquitto when on PATH, else the embedded amqtt."""
    broker = LocalBroker(data_dir=tmp_path / "broker")
    if broker.kind != "mosquitto":
        request.node.user_properties.append(("broker", "embedded amqtt"))
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture()
def forgetful_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker that keeps nothing across a restart (mosquitto without persistence, or amqtt)."""
    broker = LocalBroker(data_dir=tmp_path / "forgetful-broker", persistence=False)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[LocalPostgres]:
    """One throwaway PostgreSQL cluster for the run (started on first use, as the ``postgres`` user when
    root); skips with the reason when the Debian ``postgresql`` package is not installed."""
    reason = pg_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with LocalPostgres() as cluster:
        yield cluster


DB_ENGINES = ("sqlite", "postgresql")


def _database_url(request: pytest.FixtureRequest, folder: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{folder / 'server-db' / 'facegate.db'}"
    cluster: LocalPostgres = request.getfixturevalue("postgres_cluster")
    return cluster.create_database(f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=DB_ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The server tests' database, once per engine: a SQLite file in ``tmp_path``, and a fresh database
    in the run's throwaway PostgreSQL cluster."""
    return _database_url(request, tmp_path)


@pytest.fixture(scope="module", params=DB_ENGINES)
def module_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``db_url`` for a module-scoped server (one database per engine, shared by the module's tests)."""
    return _database_url(request, tmp_path_factory.mktemp("module-db"))


@pytest.fixture(scope="session")
def built_models() -> Path:
    """The directory holding manifest.json of the project's built models (built once, then cached)."""
    from models.convert.builder import build_all
    from models.runtime.assets import default_models_dir

    out = default_models_dir()
    # The MiniFASNet liveness models are not on PyPI; ../shared carries them (Apache-2.0). Without it the
    # manifest simply has no passive-liveness entries and the tests that need them skip.
    build_all(out, minifasnet_dir=shared_minifasnet(), progress=False)
    return out


def shared_minifasnet() -> Path | None:
    """../shared's MiniFASNet folder when present (what ``built_models`` builds with), else None."""
    folder = SHARED / "models" / "minifasnet"
    return folder if folder.is_dir() else None
