"""SIGKILL during a bundle install, at every step and at random moments: the device always restarts on
the old bundle or the new one, and whichever it is verifies and passes its self-test. Never a broken one."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from device.bundles.signing import load_public_key
from device.bundles.store import BundleStore
from tests.bundle_kit import PERSONS, build, copy_assembler, serving
from tests.mqtt_kit import keypair

REPO = Path(__file__).resolve().parents[1]
# Named install steps to die at (file:N = after copying the Nth file into staging), then random moments.
KILL_STEPS = ["staging", "file:1", "file:3", "assembled", "verified", "installed", "working", "previous",
              "switched", "done"]
RANDOM_KILLS = 4
CROWD = 20_000  # extra gallery templates so the install takes long enough to be hit at random moments

INSTALLER = textwrap.dedent("""
    import os, shutil, signal, sys, time
    from pathlib import Path
    from device.bundles.signing import load_public_key
    from device.bundles.store import BundleStore
    from server.bundles.builder import load_bundle

    root, bundle_dir, public, kill_at = sys.argv[1:5]
    store = BundleStore(Path(root), load_public_key(public), require_sealed=False)
    store.recover()
    bundle = load_bundle(Path(bundle_dir))

    def step(name):
        if name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def assemble(dest):
        for i, entry in enumerate(bundle.manifest.files):
            (dest / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.path / entry.path, dest / entry.path)
            step(f"file:{i}")

    print("go", flush=True)
    started = time.monotonic()
    store.install(bundle.announce, assemble, on_step=step)
    print(f"{time.monotonic() - started:.3f}", flush=True)
""")


def _run(root: Path, bundle_dir: Path, public: str, kill_at: str, delay: float | None) -> str:
    proc = subprocess.Popen([sys.executable, "-c", INSTALLER, str(root), str(bundle_dir), public, kill_at],
                            stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"go"
    if delay is not None:
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    out = proc.stdout.read().decode().strip()
    proc.wait(60)
    return out if proc.returncode == 0 else f"killed ({proc.returncode})"


def test_sigkill_during_install_never_leaves_a_broken_bundle(tmp_path: Path) -> None:
    private, public = keypair()
    persons = {**PERSONS, **{f"crowd-{i}": 1 for i in range(CROWD)}}
    old = build(tmp_path, private, 1, persons=dict(PERSONS))
    new = build(tmp_path, private, 2, persons=persons, tag="m2")
    assert len(new.manifest.files) >= 4
    base = tmp_path / "base"
    store = BundleStore(base, load_public_key(public), require_sealed=False)
    store.install(old.announce, copy_assembler(old))
    assert store.running_sequence == 1

    # One clean run measures how long an install takes, for the random kill moments.
    clean = tmp_path / "clean"
    shutil.copytree(base, clean)
    duration = float(_run(clean, new.path, public, "never", None))
    rng = random.Random(5)
    plan: list[tuple[str, float | None]] = [(step, None) for step in KILL_STEPS]
    plan += [("never", rng.uniform(0, duration)) for _ in range(RANDOM_KILLS)]
    outcomes = []
    for i, (step, delay) in enumerate(plan):
        root = tmp_path / f"run{i}"
        shutil.copytree(base, root)
        result = _run(root, new.path, public, step, delay)
        restarted = BundleStore(root, load_public_key(public), require_sealed=False)
        active = restarted.recover()
        assert active is not None and active.sequence in (1, 2), (step, delay, result)
        serving(restarted)  # sha256 of every file, self-test, and the gallery recognises alice
        assert not any((root / "staging").iterdir())
        outcomes.append((step if delay is None else f"t={delay:.3f}s", result, active.sequence))
    print(f"install takes {duration:.3f} s; kill point -> bundle after restart: "
          + ", ".join(f"{s}->{seq}" for s, _, seq in outcomes))
    not_killed = [(s, r) for s, r, _ in outcomes[: len(KILL_STEPS)] if r != f"killed ({-signal.SIGKILL})"]
    assert not not_killed, f"these named steps never ran, so nothing was killed there: {not_killed}"
    sequences = {seq for _, _, seq in outcomes}
    assert sequences == {1, 2}  # both sides of the atomic switch were hit
    assert dict((s, seq) for s, _, seq in outcomes[: len(KILL_STEPS)])["previous"] == 1
    assert dict((s, seq) for s, _, seq in outcomes[: len(KILL_STEPS)])["switched"] == 2
