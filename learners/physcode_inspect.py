"""After PhysCode training: label every step with its code, build and check the router, and write a
report a person can look at (`ipr physcode inspect RUN`).

Outputs in `<run>/physcode/`: router.json (per-game code -> control tables), report.md (code usage,
codes per game, router accuracy on held-out episodes), usage.png (code histogram) and codes.png
(example frame pairs x_t | x_{t+1} per code, one row per code).
"""

from __future__ import annotations

import io
import sys
from collections import Counter, defaultdict

import numpy as np
import torch

from ipr_dist.config import Config
from ipr_dist.run_layout import CALIBRATION, FEATURES, PHYSCODE, ROUTER, RunLayout
from learners.physcode import ClipData, load_clips, load_model


@torch.no_grad()
def label_codes(model, data: ClipData, clip_len: int, delta: int = 1, flow: bool = True) -> dict[int, int]:
    """Code of every row that ends a clip (for horizon `delta`): row index -> code."""
    sel = np.flatnonzero(data.clips[:, 1] == delta)
    out = {}
    for i in range(0, len(sel), 2048):
        idx = sel[i:i + 2048]
        f, u, e, _ = data.batch(idx, clip_len)
        codes = model.codes_for(f, e, u if flow else None)
        out.update(zip(data.clips[idx, 0].tolist(), codes.tolist()))
    return out


def _mse_line(metrics: dict) -> str:
    """The report's prediction line; a checkpoint saved before its held-out evaluation ran says so."""
    if "eval/recon_mse" not in metrics:
        return "- held-out future-feature MSE: not measured in this checkpoint (no held-out evaluation ran)"
    return (f"- held-out future-feature MSE {metrics['eval/recon_mse']:.6f} vs copy-last "
            f"{metrics['eval/copy_last_mse']:.6f} (ratio {metrics['eval/recon_vs_copy_last']:.3f})")


def step_outcomes(data: ClipData, level: str, gamma: float, horizon: int) -> np.ndarray:
    """What followed each step, for routing by outcome: the discounted reward of the step and the next
    `horizon` - 1 of its episode at `level` (survival: 1 per step, ending at a failure or a life lost;
    utility: the game's reward, ending where the episode ends). NaN where the shard ends first."""
    from learners.world_model import level_rewards  # it imports this module's labelling

    n = len(data.f)
    reward, done = level_rewards(data, level, lives=level == "survival")
    same_next = np.append(data.continues[1:], False)  # row r + 1 is the next step of row r's episode
    out, known = np.zeros(n), np.zeros(n, bool)
    row, going, discount = np.arange(n), np.ones(n, bool), np.ones(n)
    for k in range(horizon):
        at = row[going]
        out[going] += discount[going] * reward[at]
        ended = np.zeros(n, bool)
        ended[going] = done[at] | (k == horizon - 1)
        known |= ended
        going &= ~ended
        going[going] = same_next[row[going]]  # a step whose episode leaves the shard stays unknown
        row[going] += 1
        discount *= gamma
    return np.where(known, out, np.nan)


def build_router(cfg: Config, model, data: ClipData, labels: dict[int, int]):
    """Router tables from the training episodes, with each step's outcome (`step_outcomes`); accuracy and
    the outcome of the routed controls on the held-out ones."""
    from ipr_dist.games import game_info
    from ipr_dist.games.catalog import load_annotations
    from ipr_dist.models.router import Router, control_of

    annotations = load_annotations(cfg.games.annotation_files)
    router = Router(model.quantizer.codebook.numpy())
    rows = np.array(sorted(labels))
    held_rows = set(data.clips[data.heldout, 0].tolist())
    infos = {}
    w, p = cfg.world_model, cfg.physcode
    outcome = step_outcomes(data, w.level, w.gamma, p.routing_horizon)
    per_game: dict[str, dict] = defaultdict(lambda: {"train": ([], [], []), "test": ([], [], []),
                                                     "human": ([], [], [])})
    for r in rows:
        game = str(data.game[r])
        if game not in infos:
            infos[game] = game_info(game, annotations, cfg.games.spec_files)
        info = infos[game]
        ctl = control_of(data.keys[r], data.mouse[r], data.mouse_buttons[r], data.scroll[r], info.uses_mouse,
                         router.grid)
        # A person's steps are the router's reference (paper Sec. 10): never held out; accuracy is measured
        # on the held-out episodes of the other play.
        split = "human" if str(data.episode[r]).startswith("human-") else "test" if r in held_rows else "train"
        per_game[game][split][0].append(labels[r])
        per_game[game][split][1].append(ctl)
        per_game[game][split][2].append(outcome[r])
        per_game[game]["info"] = info
    results = {}
    for game, parts in per_game.items():
        info = parts["info"]
        if parts["human"][0]:  # a person's steps (ipr record) decide the codes they carry
            router.observe(game, len(info.keys), info.uses_mouse, *parts["human"][:2], human=True)
        if parts["train"][0] or parts["human"][0]:
            codes, controls, outcomes = parts["train"]
            router.observe(game, len(info.keys), info.uses_mouse, codes, controls, outcomes=outcomes)
            if parts["test"][0]:
                results[game] = {**router.accuracy(game, *parts["test"][:2]),
                                 **router.routed_outcomes(game, *parts["test"], p.routing_prior,
                                                          p.routing_alpha)}
        else:  # every episode of the game is held out: its table comes from them (no accuracy to report)
            codes, controls, outcomes = parts["test"]
            router.observe(game, len(info.keys), info.uses_mouse, codes, controls, outcomes=outcomes)
    return router, results


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _grid_png(rows: list[list[np.ndarray]], scale: int = 2) -> bytes:
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + 2), cols * (w + 2), 3), 40, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = img
    return _png(Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST))


def _bar_png(counts: np.ndarray) -> bytes:
    from PIL import Image, ImageDraw

    k, height = len(counts), 160
    img = Image.new("RGB", (max(4 * k, 200) + 20, height + 20), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    top = max(1, counts.max())
    for i, c in enumerate(counts):
        bar = int(height * c / top)
        draw.rectangle([10 + 4 * i, 10 + height - bar, 12 + 4 * i, 10 + height], fill=(60, 110, 200))
    return _png(img)


def inspect(cfg: Config, out=sys.stdout) -> dict:
    from ipr_dist.data.schema import decode_frames
    from ipr_dist.data.store import TrajectoryStore

    cfg = cfg.with_absolute_root()
    layout = RunLayout.of(cfg)
    model, ckpt = load_model(layout)
    p = cfg.physcode
    data = load_clips(layout, model.cfg.clip_len, ckpt["flow_pool_grid"], p.holdout, lives=True)
    data.standardise(ckpt["norm"])
    labels = label_codes(model, data, model.cfg.clip_len)
    closed = label_codes(model, data, model.cfg.clip_len, flow=False)
    agreement = float(np.mean([labels[r] == closed[r] for r in labels]))
    router, acc = build_router(cfg, model, data, labels)
    layout.write_text(ROUTER, router.dumps())

    codes = np.array([labels[r] for r in sorted(labels)])
    counts = np.bincount(codes, minlength=model.cfg.codes)
    layout.write_bytes(f"{PHYSCODE}/usage.png", _bar_png(counts))
    per_game = defaultdict(Counter)
    for r, c in labels.items():
        per_game[str(data.game[r])][c] += 1
    # example frame pairs for the most used codes
    store = TrajectoryStore(layout)
    shape = store.frame_shape()
    traj = store.dataset().to_table(columns=["frame", "next_frame"])
    order = np.argsort(-counts)[:12]
    rng = np.random.default_rng(0)
    by_code = defaultdict(list)
    for r, c in labels.items():
        by_code[c].append(r)
    rows = []
    for c in order:
        if counts[c] == 0:
            continue
        picks = rng.choice(by_code[c], min(4, len(by_code[c])), replace=False)
        pairs = []
        for r in picks:
            a = decode_frames(traj["frame"].slice(int(r), 1), shape)[0]
            b = decode_frames(traj["next_frame"].slice(int(r), 1), shape)[0]
            pairs += [a, b]
        rows.append(pairs)
    if rows:
        layout.write_bytes(f"{PHYSCODE}/codes.png", _grid_png(rows))

    used = int((counts > 0).sum())
    lines = [f"# PhysCode report: {layout.uri}", "",
             f"- checkpoint step {ckpt['step']}; codes used {used} of {model.cfg.codes}; perplexity "
             f"{float(np.exp(-(counts[counts > 0] / counts.sum() * np.log(counts[counts > 0] / counts.sum())).sum())):.1f}",
             f"- flow gate closed (inference) vs open (training): same code for {agreement:.1%} of steps",
             _mse_line(ckpt["metrics"]), "",
             "## Codes per game", "", "| game | steps | codes used | top codes |", "| --- | --- | --- | --- |"]
    for g, cnt in sorted(per_game.items()):
        top = ", ".join(f"{c} ({n})" for c, n in cnt.most_common(5))
        lines.append(f"| {g} | {sum(cnt.values())} | {len(cnt)} | {top} |")
    sharing = code_sharing(cfg, data, labels)
    lines += ["", "## Codes shared across games (held-out episodes)", "",
              f"A code counts as used by a game when it labels at least {SHARE_MIN:.0%} of that game's held-out steps. "
              f"Codes used by two or more games: {sharing['shared']} of {sharing['used']} "
              f"({sharing['shared_share']:.1%}); over all steps (any use): {sharing['shared_any']} of {sharing['used_any']}.",
              "", "| code | games (share of their held-out steps) | their annotated physics |", "| --- | --- | --- |"]
    if not sharing["codes"]:
        lines.append("| - | no code is used by two games | - |")
    for c, games in sharing["codes"]:
        lines.append(f"| {c} | " + ", ".join(f"{g} ({v:.1%})" for g, v in games) + " | " +
                     "; ".join(f"{g}: {', '.join(sharing['physics'].get(g, [])) or '-'}" for g, _ in games) + " |")
    lines += ["", "## Router on held-out episodes", "",
              "Exact: the routed control equals the recorded one. Per key: share of the game's keys in the "
              "recorded state (pointer games: exact). Baseline: always the game's most frequent control.", "",
              "| game | steps | distinct controls | exact | baseline | per key | baseline |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for g, a in sorted(acc.items()):
        lines.append(f"| {g} | {a['steps']} | {a['distinct_controls']} | {a['accuracy']:.3f} | "
                     f"{a['most_frequent_control']:.3f} | {a['key_accuracy']:.3f} | {a['key_accuracy_most_frequent']:.3f} |")
    w = cfg.world_model
    lines += ["", f"Routing by outcome (`physcode.routing: outcome`): the mean outcome ({w.level} level, "
              f"{p.routing_horizon} steps, discount {w.gamma}) of the held-out steps whose recorded control is "
              "the one each routing gives their code (steps matched), against all held-out steps (the "
              "collection's own play). Larger is better.", "",
              "| game | all steps | mode | outcome |", "| --- | --- | --- | --- |"]
    for g, a in sorted(acc.items()):
        lines.append(f"| {g} | {a['outcome_all']:.3f} ({a['outcome_steps']}) | {a['outcome_mode']:.3f} "
                     f"({a['outcome_mode_steps']}) | {a['outcome_outcome']:.3f} ({a['outcome_outcome_steps']}) |")
    lines += ["", "Router entries (codes with a control) per game, and how many came from human steps (`ipr record`; "
              "a code a person's steps carry takes its control from them, the others from random and calibration "
              "play):", "", "| game | entries | from human steps |", "| --- | --- | --- |"]
    for g, t in sorted(router.tables.items()):
        lines.append(f"| {g} | {len(t.known_codes())} | {t.human_entries()} |")
    lines += ["", "usage.png: code histogram. codes.png: per row one of the 12 most used codes, four "
              "example pairs x_t | x_{t+1}."]
    layout.write_text(f"{PHYSCODE}/report.md", "\n".join(lines) + "\n")
    print("\n".join(lines), file=out)
    return {"agreement": agreement, "router": acc, "codes_used": used, "sharing": sharing,
            "router_entries": {g: (len(t.known_codes()), t.human_entries()) for g, t in router.tables.items()}}


SHARE_MIN = 0.01  # a code "used by" a game: at least this share of the game's held-out steps


def code_sharing(cfg: Config, data: ClipData, labels: dict[int, int]) -> dict:
    """Which codes more than one game uses, on held-out episodes (the paper's point: codes shared by
    environments with similar physics), with each game's annotated physics principles."""
    from ipr_dist.games import game_info
    from ipr_dist.games.catalog import load_annotations

    held = np.zeros(len(data.f), bool)
    held[data.clips[data.heldout, 0]] = True
    held_labels = {r: c for r, c in labels.items() if held[r]} or labels
    per_game: dict[str, Counter] = defaultdict(Counter)
    for r, c in held_labels.items():
        per_game[str(data.game[r])][c] += 1
    users: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for g, cnt in per_game.items():
        total = sum(cnt.values())
        for c, n in cnt.items():
            if n / total >= SHARE_MIN:
                users[c].append((g, n / total))
    any_users: dict[int, set] = defaultdict(set)
    for r, c in labels.items():
        any_users[c].add(str(data.game[r]))
    annotations = load_annotations(cfg.games.annotation_files)
    physics = {}
    for g in per_game:
        info = game_info(g, annotations, cfg.games.spec_files)
        physics[g] = list(info.annotation.physics) if info.annotation else []
    shared = sorted((c, sorted(gs, key=lambda x: -x[1])) for c, gs in users.items() if len(gs) > 1)
    return {"used": len(users), "shared": len(shared), "shared_share": len(shared) / max(len(users), 1),
            "used_any": len(any_users), "shared_any": sum(len(gs) > 1 for gs in any_users.values()),
            "codes": shared, "physics": physics,
            "codes_per_game": {g: sum(1 for gs in users.values() for x in gs if x[0] == g) for g in per_game}}


def calibrate(cfg: Config, game: str, steps: int, out=sys.stdout) -> dict:
    """Refine the router with short calibration episodes: play `game` with random controls in this
    process, encode the steps exactly as training data were encoded, label them with codes and add
    the (code, control) counts to the game's table. The episodes are kept under
    `<run>/physcode/calibration/` as an ordinary small run (data/ and features/)."""
    from actors.env_fleet import EnvRunner
    from actors.feature_extractor import make_appearance
    from ipr_dist.data.features import extract_shard
    from ipr_dist.data.store import TrajectoryStore
    from ipr_dist.games import game_info
    from ipr_dist.games.catalog import load_annotations
    from ipr_dist.models.encoders import FlowEncoder, make_semantic_encoder
    from ipr_dist.models.router import Router, control_of

    cfg = cfg.with_absolute_root()
    layout = RunLayout.of(cfg)
    model, ckpt = load_model(layout)
    router = Router.loads(layout.read_text(ROUTER)) if layout.is_file(ROUTER) else \
        Router(model.quantizer.codebook.numpy())
    annotations = load_annotations(cfg.games.annotation_files)
    info = game_info(game, annotations, cfg.games.spec_files)
    calib = layout.sub(CALIBRATION)
    store = TrajectoryStore(calib)
    store.open_for_writing()
    calib.makedirs(FEATURES)
    calib.clean_uncommitted(FEATURES)
    done = len(store.shard_paths())
    runner = EnvRunner(0, game, cfg.env, cfg.fleet.model_copy(update={"action_source": "random"}), cfg.games,
                       seed=cfg.run.seed + 7919 + done, fleet_id=f"calib{done}", store=store)
    appearance = make_appearance(cfg.features, layout)
    flow = FlowEncoder(appearance.grid)
    semantics = make_semantic_encoder(cfg.features.semantics, cfg.features.semantics_path)
    try:
        written, _ = runner.collect(steps, 0)
    finally:
        runner.close()
    store.commit_shard(written)
    shard = calib.path("data", written.name)
    table = store.read_shard(shard)
    features = extract_shard(table, store.frame_shape(), info, list(info.keys), appearance, flow, semantics,
                             cfg.features.deltas)
    import pyarrow.parquet as pq

    pq.write_table(features, calib.path(FEATURES, written.name), filesystem=calib.fs)
    calib.commit(FEATURES, written.name, {"rows": table.num_rows})
    data = load_clips(calib, model.cfg.clip_len, ckpt["flow_pool_grid"], holdout=0.0, lives=True)
    data.standardise(ckpt["norm"])
    labels = label_codes(model, data, model.cfg.clip_len)
    names = calib.committed(FEATURES)  # feature shards are read in name order: find this one's rows
    start = sum(data.shard_rows[:names.index(written.name)])
    rows = [r for r in sorted(labels) if r >= start]
    controls = [control_of(data.keys[r], data.mouse[r], data.mouse_buttons[r], data.scroll[r], info.uses_mouse,
                           router.grid) for r in rows]
    outcome = step_outcomes(data, cfg.world_model.level, cfg.world_model.gamma, cfg.physcode.routing_horizon)
    router.observe(info.id, len(info.keys), info.uses_mouse, [labels[r] for r in rows], controls,
                   outcomes=outcome[rows])
    layout.write_text(ROUTER, router.dumps())
    summary = {"game": info.id, "steps": steps, "labelled": len(rows),
               "codes": len({labels[r] for r in rows}), "router": layout.display(ROUTER)}
    print(f"router: {info.id} calibrated on {steps} steps of random play, {len(rows)} labelled with "
          f"{summary['codes']} code{'s' if summary['codes'] != 1 else ''}; {summary['router']}", file=out)
    return summary
