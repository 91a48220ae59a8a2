"""Per-step cost of ipr-dist's own work inside an env actor, against a raw emulator step.

    .venv/bin/python benchmarks/actor_overhead.py

Times, in one process: the actor's chunk loop with the environment stubbed out, the retro env
wrapper (unified action -> button mask, info, 320x224 -> 64x64 resize) with the emulator stubbed
out, and a raw stable-retro step. Results go to benchmarks/results/actor_overhead.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_result  # noqa: E402


def per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    import cv2

    from actors.env_fleet import EnvRunner
    from ipr_dist.config import load_config

    cv2.setNumThreads(1)
    cfg = load_config(None, ["env.frame_size=[64, 64]", "env.frame_skip=1"])
    runner = EnvRunner(0, "Airstriker-Genesis", cfg.env, cfg.fleet, cfg.games, 0, "bench", None)
    env, raw = runner.env, runner.env._retro
    obs, info = runner.obs, dict(runner.info)
    screen = raw.get_screen()

    class EnvStub:
        game = env.game

        def step(self, action):
            return obs, 0.0, False, False, info

        def reset(self, seed=None):
            return obs, info

    class EmulatorStub:
        unwrapped = raw.unwrapped

        def step(self, mask):
            return screen, 0.0, False, False, {"lives": 3, "score": 0}

    runner.env = EnvStub()
    loop = per_call_us(lambda: runner.play_chunk(256, 0), 40) / 256
    runner.env = env
    action = runner.source(obs, info)
    env._retro = EmulatorStub()
    wrapper = per_call_us(lambda: env.step(action), 10_000)
    env._retro = raw

    def raw_step():
        if raw.step(raw.action_space.sample())[2]:
            raw.reset()

    emulator = per_call_us(raw_step, 3000)
    result = {"benchmark": "actor_overhead", "chunk_loop_us_per_step": round(loop, 1), "env_wrapper_us_per_step": round(wrapper, 1),
              "raw_step_us": round(emulator, 1), "overhead_share": round((loop + wrapper) / emulator, 3),
              "date": time.strftime("%Y-%m-%d")}
    print(result)
    write_result(result)


if __name__ == "__main__":
    main()
