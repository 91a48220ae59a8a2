import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IPR = [sys.executable, "-m", "ipr_dist.cli"]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the in-process fleet tests (token authentication left on)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


def copy_run(src: Path, dest_root: Path) -> Path:
    """A copy of the run directory `src` under `dest_root` (a moved run directory is the run)."""
    import shutil

    dest = dest_root / src.name
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("ray_train"))
    return dest


@pytest.fixture(scope="session")
def collected_run(tmp_path_factory):
    """The smoke preset collected once on a retro and an HTML game. Never handed to a test: tests get
    copies (`smoke_run`, `aligned_smoke_run`), so none depends on what another one did to it."""
    root = tmp_path_factory.mktemp("collected")
    proc = run_ipr("collect", "configs/smoke.yaml", "--set", f"run.root={root}",
                   "--set", "fleet.games=[Airstriker-Genesis, Bounce-Html]")
    assert proc.returncode == 0, proc.stderr
    return root / "smoke"


@pytest.fixture
def smoke_run(collected_run, tmp_path):
    """A fresh copy of the collected smoke run: the stage tests train on it as they like."""
    return copy_run(collected_run, tmp_path / "collected")


@pytest.fixture(scope="session")
def aligned_source(collected_run, tmp_path_factory):
    """The smoke run through Stage 3 (PhysCode, router, world model, alignment), built once from its own
    copy of the collected run; read only through `aligned_smoke_run` copies."""
    run = copy_run(collected_run, tmp_path_factory.mktemp("aligned"))
    for stage in (("physcode", "train"), ("physcode", "inspect"), ("world-model", "train")):
        proc = run_ipr(*stage, str(run), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_ipr("policy", "align", str(run), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval/first_code_accuracy" in proc.stdout and "eval/first_code_baseline" in proc.stdout
    return run


@pytest.fixture
def aligned_smoke_run(aligned_source, tmp_path):
    """A fresh copy of the smoke run trained through Stage 3: Stage 4, evaluation and serving tests
    write into their own."""
    return copy_run(aligned_source, tmp_path / "aligned")


def committed(run: Path, name: str) -> Path | None:
    """The committed version directory of a run's checkpoint `name` (e.g. "policy/aligned"), or None."""
    from ipr_dist.run_layout import RunLayout

    path = RunLayout(str(run)).checkpoint_path(name)
    return Path(path) if path else None


def run_ipr(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `ipr` command line in a fresh process, as a user would (`env`: variables to change)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([*IPR, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: non-zero exit, no traceback, one `ipr: error:` line naming the problem."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ipr: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_picture(path: Path, min_size: tuple[int, int] = (200, 150)) -> None:
    """A PNG that decodes, at least `min_size` pixels, and not blank (its pixels are not all one colour)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1], (path, img.size)
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2, f"{path} is blank"


def wait_for(predicate, what: str, timeout_s: float = 120.0, every_s: float = 0.05):
    """Poll `predicate` until it returns something true and return that. The deadline only bounds a
    hang (it is generous; nothing here bets on how fast a machine is): on expiry the test fails naming
    `what` it was waiting for (a callable `what` is asked then, for the state at that moment)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout_s:.0f} s waiting for {what() if callable(what) else what}")
        time.sleep(every_s)


def kill_session(sid: int, timeout_s: float = 120.0) -> None:
    """SIGKILL every process of session `sid` (a driver started with `start_new_session=True` and the local
    Ray it started: some of Ray's processes leave the driver's process group but not its session) and wait
    until none is left, so nothing of the killed run still writes while the test goes on."""
    import os
    import signal

    def alive() -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == sid:
                        pids.append(int(entry))
                except (ProcessLookupError, PermissionError):
                    pass
        return pids

    def gone() -> bool:
        for pid in alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not [pid for pid in alive() if not _zombie(pid)]  # a zombie writes nothing more

    wait_for(gone, f"every process of the killed session {sid} to end", timeout_s=timeout_s, every_s=0.2)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True  # gone meanwhile
