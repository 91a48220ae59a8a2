"""HTML environment steps/s against a bare Playwright loop on the same page, and fleet scaling.

    .venv/bin/python benchmarks/html_throughput.py [--game Bounce-Html] [--seconds 6]

Bare loop: Chromium with the page clock paused, the game page loaded, then per step
`page.clock.run_for(16)` and one `page.evaluate` reading the canvas (getImageData, base64), the
frame decoded in Python. Environment: HtmlGameEnv.step with random actions (input events, clock,
variables and canvas in one page call). Both are measured in this process, alternately, and the
median over repeats is kept. Fleet: 1, 2 and 4 HTML environment actors, frames delivered to the
driver. Results go to benchmarks/results/html_throughput.json.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_result  # noqa: E402

READ_CANVAS = """sel => {
  const c = document.querySelector(sel), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = ''; for (let i = 0; i < d.length; i += 0x8000) s += String.fromCharCode.apply(null, d.subarray(i, i + 0x8000));
  return [c.width, c.height, btoa(s)];
}"""


class BareLoop:
    def __init__(self, spec):
        from ipr_dist.games.browser import find_browser
        from ipr_dist.games.html_env import PAUSED_AT, _SharedBrowser

        self.spec = spec
        # The same Chromium (same flags) as the environments; a context of its own.
        self.context = _SharedBrowser.acquire(find_browser(), spec.id).new_context()
        self.context.clock.pause_at(PAUSED_AT)
        root = spec.root

        def serve(route):
            path = root / route.request.url.split("/", 3)[3].split("?")[0]
            route.fulfill(body=path.read_bytes(), content_type="text/html" if path.suffix == ".html" else "text/javascript")

        self.context.route("http://bench.invalid/**", serve)
        self.page = self.context.new_page()
        self.page.goto(f"http://bench.invalid/{spec.entry_path.name}?seed=0")

    def steps_per_second(self, seconds: float) -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.page.clock.run_for(16)
            w, h, frame = self.page.evaluate(READ_CANVAS, self.spec.canvas)
            np.frombuffer(base64.b64decode(frame), np.uint8).reshape(h, w, 4)
            n += 1
        return n / (time.perf_counter() - start)

    def close(self):
        from ipr_dist.games.html_env import _SharedBrowser

        self.context.close()
        _SharedBrowser.release()


def env_steps_per_second(env, seconds: float) -> float:
    from ipr_dist.games.actions import RandomActions

    source = RandomActions(env.game.keys, env.game.uses_mouse, seed=0)
    obs, info = env.reset(seed=0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        obs, _, term, trunc, info = env.step(source(obs, info))
        n += 1
        if term or trunc:
            obs, info = env.reset()
    return n / (time.perf_counter() - start)


def fleet_steps_per_second(cfg, game: str, envs: int, seconds: float) -> float:
    """The fleet as collection runs it: each env actor writes its chunks as shards to a local store."""
    import tempfile

    from actors.env_fleet import EnvFleet
    from ipr_dist.data.store import TrajectoryStore

    fleet_cfg = cfg.fleet.model_copy(update={"num_envs": envs})
    with tempfile.TemporaryDirectory() as tmp:
        store = TrajectoryStore(tmp)
        store.open_for_writing()
        fleet = EnvFleet([game], cfg.env, fleet_cfg, 0, cfg.games, store)
        try:
            fleet.run(fleet_cfg.chunk_steps * envs)  # warm-up
            budget = int(250 * min(envs, os.cpu_count() or 1) * seconds)
            start = time.perf_counter()
            fleet.run(budget)
            return budget / (time.perf_counter() - start)
        finally:
            fleet.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--game", default="Bounce-Html")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--envs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", help="result file (default: benchmarks/results/<benchmark>.json)")
    args = ap.parse_args()

    import ray

    from ipr_dist.config import load_config
    from ipr_dist.games.specs import find_game_spec
    from ipr_dist.games.html_env import HtmlGameEnv

    spec = find_game_spec(args.game)
    cores = os.cpu_count() or 1
    bare = BareLoop(spec)
    envs = {size: HtmlGameEnv(spec, frame_size=size) for size in [(64, 64), (240, 320)]}
    samples: dict[str, list[float]] = {"bare": [], "env_64x64": [], "env_240x320": []}
    bare.steps_per_second(1.0)
    for _ in range(args.repeats):  # alternate, so drift of the shared machine hits all alike
        samples["bare"].append(bare.steps_per_second(args.seconds))
        samples["env_64x64"].append(env_steps_per_second(envs[(64, 64)], args.seconds))
        samples["env_240x320"].append(env_steps_per_second(envs[(240, 320)], args.seconds))
    bare.close()
    for env in envs.values():
        env.close()
    med = {k: float(np.median(v)) for k, v in samples.items()}
    print(f"bare Playwright loop (run_for + read canvas): {med['bare']:.0f} steps/s")
    for k in ("env_64x64", "env_240x320"):
        print(f"{k}: {med[k]:.0f} steps/s  ratio to bare {med[k] / med['bare']:.2f}")

    cfg = load_config(None, ["env.frame_size=[64, 64]", "fleet.chunk_steps=128", "fleet.cpus_per_env=0.25"])
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="warning")
    fleet_rows = []
    for n in args.envs:
        rate = fleet_steps_per_second(cfg, args.game, n, args.seconds)
        fleet_rows.append({"envs": n, "steps_per_s": round(rate, 1)})
        print(f"fleet {n} HTML envs: {rate:.0f} steps/s")
    ray.shutdown()
    base = fleet_rows[0]["steps_per_s"]
    for row in fleet_rows:
        row["speedup_vs_1"] = round(row["steps_per_s"] / base, 2)
    result = {
        "benchmark": "html_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {cores} cores, {platform.python_version()}",
        "game": args.game,
        "steps_per_s": {k: round(v, 1) for k, v in med.items()},
        "samples": {k: [round(x, 1) for x in v] for k, v in samples.items()},
        "ratio_env_to_bare": {k: round(med[k] / med["bare"], 3) for k in ("env_64x64", "env_240x320")},
        "target": "single environment >= 0.8 x bare loop; fleet scales with cores",
        "fleet": fleet_rows,
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
