"""Stage 4's world-model learner: the agent's own real steps keep training the world model.

Stage 2 trains the world model, its critic and its reward and continuation heads once, on the
collection's random play; the paper freezes them only at test time ("remains in the loop but no
longer updates"). Here a Ray actor holds a copy on its own device and, after every acting round,
learns from the steps the agent just played:
  - each new step (f_t, a_t, r_t, done_t, f_{t+1}), a_t the code the agent executed, once its TD target
    is known, first scores the critic as it stands: its TD error on steps it has never trained on
    (`world_model/online_td_error`), beside Stage 2's critic, frozen, on the same steps
    (`world_model/online_td_error_stage2`: the agent's play changes, so the error alone moves with it), both
    also per game (`.../<game>`: where the policy's steps leave Stage 2's critic far from its held-out error);
  - then, once the buffer holds `online_learning_starts` steps, `online_updates` steps of AdamW (the rate
    warmed up over `online_warmup` updates) on batches drawn from the recent steps (a ring of
    `online_buffer`): Eq. 19's one-step L1 for the dynamics' own last layer and head (also the layers the
    critic shares with them with `online_train_shared`; transitions within an episode) and
    Eq. 20 with the reward and continuation heads for the value branch, each loss on its own
    parameters, the target network following by Polyak averaging. The max of Eq. 20 ranges over the
    codes the router can execute in the step's game. With `td_steps` n > 1 the value target is the
    n-step one Stage 2 trained on: each environment's steps arrive round after round in time order,
    and a step joins the buffer once its n next steps are known, its episode ended within them, or its
    environment's stream broke (a time limit ended the episode, or the environment restarted);
  - where Stage 2 trained its critic to rank (`critic_rank_weight` > 0), each update also ranks a batch of
    its steps whose observed return is known (the rows its checkpoint keeps, `online_rank_rows`), weighted
    by `online_rank_weight`: TD alone on the
    agent's steps undid most of Stage 2's ranking (docs/world_model.md). At each publish the critic's
    within-game Spearman on the held-out ones is logged (`world_model/online_rank_heldout_spearman`).
Every `online_publish_every` updates the weights become a new version of `<run>/world_model/online/`
(written whole, then its pointer: ipr_dist/run_layout.py); the scorer reloads a new version as it does
the policy's, and the agent (Stage 4 resumed, `ipr eval`, `ipr serve`) starts from the latest one, where
nothing updates it any more.
"""

from __future__ import annotations

import io

import numpy as np
import ray
import torch

from ipr_dist.run_layout import WORLD_MODEL_CHECKPOINT, WORLD_MODEL_ONLINE, CheckpointRef, RunLayout

STATE_FILE = "checkpoint.pt"  # the same file name and format as world_model/checkpoint/


def latest_world_model(cfg) -> CheckpointRef:
    """The Stage 4 (online) world model once it has a version, otherwise Stage 2's."""
    layout = RunLayout.of(cfg)
    online = CheckpointRef(layout, WORLD_MODEL_ONLINE)
    return online if online.exists() else CheckpointRef(layout, WORLD_MODEL_CHECKPOINT)


def seed_online(cfg) -> None:
    """Stage 4's first version of the online world model: Stage 2's checkpoint as it is (so the scorer
    watches the version the learner publishes to from the start)."""
    layout = RunLayout.of(cfg)
    if CheckpointRef(layout, WORLD_MODEL_ONLINE).exists():
        return
    data = layout.read_checkpoint_file(WORLD_MODEL_CHECKPOINT, STATE_FILE)
    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    ckpt.update(optimizer=None, online_updates=0, online_steps=0, rehearsal=None)  # the learner reads Stage 2's
    layout.save_torch(WORLD_MODEL_ONLINE, STATE_FILE, ckpt, step=0)


class NStepStreams:
    """Each environment's steps in time order (a stream), turned into n-step TD targets: a step is ready
    once its window of m <= n steps (itself and the next ones) is known, the window ending at n steps, at
    the step that ended its episode, or where the stream was cut. Its target is then G = sum_{j<m}
    gamma^j r_{t+j} plus discount = gamma^m (0 if the window ends the episode) times the value at f_boot,
    the frame after the window's last step. n = 1 is Eq. 20's one-step target."""

    def __init__(self, n: int, gamma: float):
        self.n, self.gamma = n, gamma
        self.pending: dict[int, list[tuple]] = {}  # stream -> steps (f, code, reward, done, f_next, game)

    def push(self, stream: int, step: tuple, cut: bool = False) -> list[tuple]:
        """One step of `stream` (the one after its previous step); returns the steps now ready, each as
        (*step, G, f_boot, discount). `cut`: the stream breaks after this step (its next step, if any,
        starts another episode), so every pending step is ready."""
        waiting = self.pending.setdefault(stream, [])
        waiting.append(step)
        return self._release(waiting, cut)

    def flush(self, stream: int) -> list[tuple]:
        """The stream broke after its last step (its environment restarted): its pending steps, ready."""
        return self._release(self.pending.pop(stream, []), True)

    def _release(self, waiting: list[tuple], everything: bool) -> list[tuple]:
        """Take the ready steps off the front of `waiting` (all of them when `everything`)."""
        ready = []
        while waiting and (everything or len(waiting) >= self.n or any(s[3] for s in waiting[:self.n])):
            ready.append(self._target(waiting))
            waiting.pop(0)
        return ready

    def _target(self, waiting: list[tuple]) -> tuple:
        g, discount, last = 0.0, 1.0, waiting[0]
        for step in waiting[:self.n]:
            g += discount * float(step[2])
            discount *= self.gamma
            last = step
            if step[3]:
                break
        return (*waiting[0], g, last[4], 0.0 if last[3] else discount)


@ray.remote
class WorldModelLearner:
    def __init__(self, cfg_dict: dict, allowed: dict[str, np.ndarray]):
        from actors.world_model_scorer import load_world_model, run_settings
        from ipr_dist.config import Config
        from ipr_dist.devices import actor_device

        cfg = Config.model_validate(cfg_dict)
        self.w = cfg.world_model
        self.layout = RunLayout.of(cfg)
        self.device = actor_device()
        torch.set_num_threads(1)
        torch.manual_seed(cfg.run.seed)
        ref = CheckpointRef(self.layout, WORLD_MODEL_ONLINE)
        data = self.layout.read_checkpoint_file(WORLD_MODEL_ONLINE, STATE_FILE)
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        self.model = load_world_model(ref, "cpu", settings=run_settings(self.w))
        self.model.freeze_dynamics()
        if ckpt.get("target") is not None:
            self.model.target.load_state_dict(ckpt["target"])
        self.model.requires_grad_(True)
        self.model.to(self.device).train()
        self.critic = self.model.value_branch()
        ids = {id(p) for p in self.critic}
        # The layers the critic shares with the dynamics (embedding, trunk) learn online only when asked:
        # moved by the dynamics loss, they change what the critic's last layer reads (docs/world_model.md)
        own = {id(p) for p in (*self.model.dyn_last.parameters(), *self.model.dyn_head.parameters())}
        self.dynamics = [p for p in self.model.parameters()
                         if id(p) not in ids and (self.w.online_train_shared or id(p) in own)]
        self.opt = torch.optim.AdamW([{"params": self.dynamics}, {"params": self.critic}], lr=self.w.online_lr,
                                     weight_decay=0.0)
        state = ckpt.get("optimizer") if ckpt.get("online_updates", 0) > 0 else None
        if state is not None and [len(g["params"]) for g in state["param_groups"]] == [len(self.dynamics), len(self.critic)]:
            self.opt.load_state_dict(state)  # otherwise online_train_shared changed since: moments start afresh
        self.updates, self.steps_seen = ckpt.get("online_updates", 0), ckpt.get("online_steps", 0)
        self.games = sorted(allowed)
        self.allowed = torch.as_tensor(np.stack([allowed[g] for g in self.games]), device=self.device)
        k, f_dim = self.model.codes, self.model.cfg.f_dim
        n = self.w.online_buffer
        self.f, self.f_next = torch.zeros(n, f_dim), torch.zeros(n, f_dim)
        self.code, self.game = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        self.reward, self.done = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
        self.g, self.f_boot, self.discount = torch.zeros(n), torch.zeros(n, f_dim), torch.zeros(n)  # n-step target
        self.streams = NStepStreams(self.w.td_steps, self.model.cfg.gamma)
        self.size, self.head = 0, 0
        self.rng = np.random.default_rng(cfg.run.seed + 17)
        self.codes = k
        self.rank_weight, self.rank = self.w.online_rank_weight, None
        stage2 = self.layout.load_torch(WORLD_MODEL_CHECKPOINT, STATE_FILE)
        # Stage 2's critic as it was, never trained here: its TD error on the same new steps is the reference
        # that tells learning from a change in what the agent plays (`world_model/online_td_error_stage2`)
        self.stage2 = load_world_model(stage2, "cpu", settings=run_settings(self.w))
        self.stage2.freeze_dynamics()
        if stage2.get("target") is not None:
            self.stage2.target.load_state_dict(stage2["target"])
        self.stage2.requires_grad_(False).to(self.device)
        rows = stage2.get("rehearsal") if self.rank_weight > 0 else None
        if rows is not None:  # Stage 2's ranked steps, each game by an index of its own
            names = sorted(set(rows["game"]))
            game = torch.as_tensor([names.index(g) for g in rows["game"]])
            self.rank = {k: v.to(self.device) for k, v in (("f", rows["f"].float()), ("code", rows["code"]),
                                                            ("returns", rows["returns"].float()), ("game", game))}
            self.rank_train = np.flatnonzero(~rows["heldout"].numpy())
            self.rank_heldout = np.flatnonzero(rows["heldout"].numpy())

    def add(self, f: np.ndarray, code: np.ndarray, reward: np.ndarray, done: np.ndarray, f_next: np.ndarray,
            games: list[str], streams: list[int], cut: list[bool], broken: list[int] = ()) -> dict:
        """New real steps (f_t, a_t, r_t already at the run's level and scale, done_t, f_{t+1}), each of
        `streams` in time order, `cut` where its stream breaks after it; `broken`: streams that broke
        before these steps (their environments restarted). Each step is ready once its n-step target is
        known; the critic's TD error on the ready steps, against the target it learns, is measured before
        they join the buffer (it has never trained on them)."""
        ready = [step for stream in broken for step in self.streams.flush(stream)]
        # copies: arrays from Ray's object store are read-only
        batch = (torch.tensor(f, dtype=torch.float32), torch.tensor(code, dtype=torch.long),
                 torch.tensor(reward, dtype=torch.float32), torch.tensor(done, dtype=torch.bool),
                 torch.tensor(f_next, dtype=torch.float32),
                 torch.as_tensor([self.games.index(g) for g in games], dtype=torch.long))
        for i in range(len(code)):  # NStepStreams' order: f, code, reward, done, f_next, game
            ready += self.streams.push(int(streams[i]), tuple(x[i] for x in batch), bool(cut[i]))
        self.steps_seen += len(code)
        out = {"world_model/online_steps": self.steps_seen}
        if not ready:
            return out
        columns = [torch.stack([torch.as_tensor(s[j]) for s in ready]) for j in range(9)]
        f_r, code_r, reward_r, done_r, f_next_r, game_r, g, f_boot, discount = (x.to(self.device) for x in columns)
        with torch.no_grad():
            args = (f_r, code_r, reward_r.float(), f_next_r, done_r, self.allowed[game_r])
            n_step = (g.float(), f_boot, discount.float())

            def on(model, rows=slice(None)):  # the value loss of `model` on the ready steps `rows`
                return model.value_loss(*(a[rows] for a in args), n_step=tuple(x[rows] for x in n_step))

            loss, reference = on(self.model), on(self.stage2)
            for game in torch.unique(game_r).tolist():  # and per game: where the agent's play leaves which critic
                name = self.games[game]
                out[f"world_model/online_td_error/{name}"] = float(on(self.model, game_r == game)["td_error"])
                out[f"world_model/online_td_error_stage2/{name}"] = float(on(self.stage2, game_r == game)["td_error"])
            ongoing = ~done_r  # one failure's error (about the value itself) swamps a round's mean: apart too
            if ongoing.any():
                out["world_model/online_td_error_ongoing"] = float(on(self.model, ongoing)["td_error"])
        idx = (self.head + torch.arange(len(ready))) % len(self.code)
        for store, column in zip((self.f, self.code, self.reward, self.done, self.f_next, self.game, self.g,
                                  self.f_boot, self.discount), columns):
            store[idx] = column.to(store.dtype)
        self.head = int((self.head + len(ready)) % len(self.code))
        self.size = min(self.size + len(ready), len(self.code))
        return {**out, "world_model/online_td_error": float(loss["td_error"]),
                "world_model/online_td_error_stage2": float(reference["td_error"]),
                "world_model/online_value": float(loss["value"]),
                "world_model/online_value_stage2": float(reference["value"]),
                "world_model/online_terminal_steps": int(done_r.sum()),
                "world_model/online_reward_error": float(loss["reward_error"]),
                # the critic members' disagreement on the agent's new steps (with member heads)
                **({"world_model/online_member_spread": float(loss["member_spread"])} if "member_spread" in loss
                   else {})}

    def train(self, updates: int) -> dict:
        """`updates` optimizer steps on batches of the buffer; publishes a new version every
        `online_publish_every` updates. Returns the last losses and whether it published."""
        import torch.nn.functional as F

        if self.size < self.w.online_learning_starts:
            return {}
        m, published = {}, False
        for _ in range(updates):
            rows = torch.as_tensor(self.rng.integers(0, self.size, min(self.w.online_batch, self.size)))
            f, code, reward, f_next, done, game, g, f_boot, discount = (
                x[rows].to(self.device) for x in (self.f, self.code, self.reward, self.f_next, self.done, self.game,
                                                  self.g, self.f_boot, self.discount))
            for group in self.opt.param_groups:
                group["lr"] = self.w.online_lr * min(1.0, (self.updates + 1) / max(1, self.w.online_warmup))
            self.opt.zero_grad()
            within = ~done  # f_{t+1} of a step that ended its episode is the next episode's first frame
            if within.any():
                pred = self.model.predict(f[within][:, None], code[within][:, None])[:, 0]
                dyn = F.l1_loss(pred, f_next[within])
                dyn.backward(inputs=self.dynamics)
                m["world_model/online_dynamics_l1"] = dyn.item()
            value = self.model.value_loss(f, code, reward, f_next, done, self.allowed[game], n_step=(g, f_boot, discount))
            loss = value["loss"]
            if self.rank is not None:
                rows = torch.as_tensor(self.rng.choice(self.rank_train, self.w.online_batch), device=self.device)
                rank = self.model.rank_loss(*(self.rank[k][rows] for k in ("f", "code", "returns", "game")))
                loss = loss + self.rank_weight * rank
                m["world_model/online_rank_loss"] = rank.item()
            loss.backward(inputs=self.critic)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.w.grad_clip)
            self.opt.step()
            self.model.update_target()
            self.updates += 1
            m["world_model/online_td_error_train"] = value["td_error"].item()
            if self.updates % self.w.online_publish_every == 0:
                self.publish()
                published = True
                m.update(self.rank_heldout_spearman())
        return {**m, "world_model/online_updates": self.updates, "world_model/online_published": int(published)}

    @torch.no_grad()
    def rank_heldout_spearman(self) -> dict:
        """The critic's Spearman rho with the observed returns of Stage 2's held-out rehearsal steps, averaged
        over the games (empty without them)."""
        from learners.world_model import within_game_spearman

        if self.rank is None or len(self.rank_heldout) < 3:
            return {}
        rows = torch.as_tensor(self.rank_heldout, device=self.device)
        v = self.model.value(self.rank["f"][rows], self.rank["code"][rows]).cpu().numpy()
        within = within_game_spearman(v, *(self.rank[k][rows].cpu().numpy() for k in ("returns", "game")))
        return {"world_model/online_rank_heldout_spearman": float(np.nanmean(list(within.values())))} if within else {}

    def publish(self) -> int:
        """The current weights as a new version of world_model/online/ (the scorer reloads it)."""
        model = self.model
        ckpt = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "phase": 2,
                "step": self.updates, "config": model.cfg.__dict__,
                "target": {k: v.detach().cpu() for k, v in model.target.state_dict().items()},
                "optimizer": self.opt.state_dict(), "metrics": {}, "online_updates": self.updates,
                "online_steps": self.steps_seen}
        self.layout.save_torch(WORLD_MODEL_ONLINE, STATE_FILE, ckpt, step=self.updates)
        return self.updates
