"""Desktop environments: frame-stepped steps/s for 1, 2 and 4 envs, where a step's time goes, and how
far two plays of one fixed action sequence agree.

    .venv/bin/python benchmarks/desktop_env.py [--game Xmoto-Desktop] [--seconds 20] [--repeat-steps 60]

Steps/s: each env (its own process, Xvfb and game) plays random actions for `--seconds`; the rate of
steps is compared with the game-time budget 1000 / frame_ms (a stepped env runs the game for frame_ms
of wall time per step, so it cannot go faster: the ratio says how much of a step is overhead).
Shares split the step time into input (XTest events), game (the game running its slice), capture
(MIT-SHM grab and resize) and readers (pixel readers); resets (a fresh game process per episode)
are counted apart. Repeatability: the same scripted action sequence is played twice from reset;
per step, the mean absolute difference of the native frames (0-255) and the share of identical
frames, against two plays of different sequences as the reference; `new_frame_share` is the share of
steps whose frame differs from the one before (below 1 when the game draws slower than one frame per
step). Results go to benchmarks/results/desktop_env.json (X-Moto) or desktop_env_<game>.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import RESULTS, write_result  # noqa: E402


def _play(game: str, seconds: float, seed: int) -> dict:
    from ipr_dist.config import EnvConfig
    from ipr_dist.games import make_env
    from ipr_dist.games.actions import RandomActions

    env = make_env(game, EnvConfig(frame_size=(128, 128)))
    try:
        source = RandomActions(env.game.keys, env.game.uses_mouse, seed=seed)
        reset_s, resets, new_frames = 0.0, 0, 0
        t = time.perf_counter()
        obs, info = env.reset(seed=seed)
        reset_s += time.perf_counter() - t
        last = env.native_frame()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            obs, _, term, trunc, info = env.step(source(obs, info))
            frame = env.native_frame()
            new_frames += not np.array_equal(frame, last)
            last = frame
            if term or trunc:
                t = time.perf_counter()
                obs, info = env.reset()
                reset_s += time.perf_counter() - t
                resets += 1
                last = env.native_frame()
        wall = time.perf_counter() - start
        timing = dict(env.timing)
        return {"steps": timing.pop("steps"), "wall_s": wall, "reset_s": reset_s, "resets": resets,
                "new_frames": new_frames, **timing}
    finally:
        env.close()


def fleet(game: str, n: int, seconds: float) -> dict:
    with mp.get_context("spawn").Pool(n) as pool:
        runs = pool.starmap(_play, [(game, seconds, i) for i in range(n)])
    steps = sum(r["steps"] for r in runs)
    wall = max(r["wall_s"] for r in runs)
    step_time = sum(r["input"] + r["game"] + r["capture"] + r["read"] for r in runs)
    shares = {k: round(sum(r[k] for r in runs) / step_time, 3) for k in ("input", "game", "capture", "read")}
    return {"envs": n, "steps": steps, "steps_per_s": round(steps / wall, 2),
            "per_env_steps_per_s": round(steps / wall / n, 2),
            "stepping_steps_per_s_per_env": round(sum(r["steps"] for r in runs) / step_time, 2),
            "new_frame_share": round(sum(r["new_frames"] for r in runs) / max(steps, 1), 3),
            "resets": sum(r["resets"] for r in runs), "reset_share_of_wall": round(
                sum(r["reset_s"] for r in runs) / sum(r["wall_s"] for r in runs), 3),
            "step_time_shares": shares}


def _frames(game: str, combos: list[list[str]], hold: int, steps: int) -> np.ndarray:
    from ipr_dist.config import EnvConfig
    from ipr_dist.games import make_env
    from ipr_dist.games.actions import ScriptedActions

    env = make_env(game, EnvConfig(frame_size=(128, 128)))
    try:
        obs, info = env.reset(seed=0)
        source = ScriptedActions(env.game.keys, combos, hold)
        frames = [env.native_frame()]
        for _ in range(steps):
            obs, _, term, trunc, info = env.step(source(obs, info))
            frames.append(env.native_frame())
            if term or trunc:
                break
        return np.stack(frames)
    finally:
        env.close()


def _agreement(a: np.ndarray, b: np.ndarray) -> dict:
    n = min(len(a), len(b))
    mad = np.abs(a[:n].astype(np.int16) - b[:n].astype(np.int16)).mean(axis=(1, 2, 3))
    return {"steps_compared": int(n), "mean_abs_diff": round(float(mad.mean()), 2),
            "mean_abs_diff_first_half": round(float(mad[: n // 2].mean()), 2),
            "mean_abs_diff_second_half": round(float(mad[n // 2:].mean()), 2),
            "identical_frames": round(float((mad == 0).mean()), 3)}


def repeatability(game: str, steps: int) -> dict:
    seq = [["ArrowUp"], ["ArrowUp", "ArrowLeft"], [], ["ArrowRight"]]
    other = [["ArrowDown"], ["ArrowRight"], ["ArrowUp", "ArrowRight"], []]
    a, b, c = _frames(game, seq, 8, steps), _frames(game, seq, 8, steps), _frames(game, other, 8, steps)
    same, diff = _agreement(a, b), _agreement(a, c)
    return {"same_sequence": same, "different_sequences (reference)": diff,
            "ratio_same_to_different": round(same["mean_abs_diff"] / max(diff["mean_abs_diff"], 1e-9), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--game", default="Xmoto-Desktop")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--repeat-steps", type=int, default=60)
    ap.add_argument("--envs", default="1,2,4")
    args = ap.parse_args()
    from ipr_dist.games.specs import find_game_spec

    spec = find_game_spec(args.game)
    budget = 1000 / spec.frame_ms
    scaling = []
    for n in (int(x) for x in args.envs.split(",")):
        row = fleet(args.game, n, args.seconds)
        row["stepping_rate_over_budget"] = round(row["stepping_steps_per_s_per_env"] / budget, 3)
        scaling.append(row)
        print(row, flush=True)
    result = {"benchmark": "desktop_env", "game": args.game, "mode": spec.mode, "frame_ms": spec.frame_ms,
              "budget_steps_per_s": round(budget, 2), "scaling": scaling,
              "repeatability": repeatability(args.game, args.repeat_steps),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    print(result["repeatability"])
    # X-Moto, the first shipped spec, keeps the plain name; other games get their own file
    write_result(result, None if args.game == "Xmoto-Desktop" else RESULTS / f"desktop_env_{args.game}.json")


if __name__ == "__main__":
    main()
