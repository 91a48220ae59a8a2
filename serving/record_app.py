"""`ipr record RUN`: a local web page where a person plays a game and tags what happens; every step
goes to the run's store with source `human` (ipr_dist/data/recording.py).

The game runs server-side in the fleet's own environment (retro, HTML in headless Chromium under its
virtual clock, desktop on its Xvfb), one step per request from the page: the page sends the keys
and pointer it holds, the server steps the env and answers with the frame, score, lives and elapsed
time. So a step is always one game frame (retro: native rate; HTML: 16 ms of virtual time, 60 FPS),
whatever the network or the person's machine does. Served on 127.0.0.1 with a token: the page's URL
carries it (`/?token=...`) and the page sends it as `Authorization: Bearer` on every call.

Every env call runs on one thread (Playwright's sync API and stable-retro's emulator are bound to
the thread that made them); one session at a time.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ipr_dist.data.recording import RecordingError, RecordingSession, SessionConflict

MAX_BODY = 64 * 1024  # every request of the page is small; a larger body is refused before parsing


def page_keymap(keys: list[str], kind: str) -> dict[str, str]:
    """Browser KeyboardEvent.key -> the game's key name. HTML and desktop games use browser key names
    already; retro buttons get arrows for the pad, Enter for START, Shift for SELECT/MODE and letters
    (z x c a s d q w e) for the rest, in the game's button order."""
    if kind in ("html", "desktop"):
        return {(" " if k == "Space" else k.lower() if len(k) == 1 else k): k for k in keys}
    out: dict[str, str] = {}
    letters = iter("zxcasdqwe")
    for k in keys:
        if k in ("UP", "DOWN", "LEFT", "RIGHT"):
            out[f"Arrow{k.capitalize()}"] = k
        elif k == "START":
            out["Enter"] = k
        elif k in ("SELECT", "MODE"):
            out["Shift"] = k
        else:
            letter = next(letters, None)
            if letter:
                out[letter] = k
    return out


def _png(frame: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def tag_choices(game) -> list[str]:
    """Tags offered for a game: its annotation's physics, causal relations, goal and control meanings."""
    a = game.annotation
    if a is None:
        return []
    return [*a.physics, *a.causal, *([a.goal] if a.goal else []), *a.controls.values()]


def build_record_app(cfg, games: list[str], token: str, player: str = "player"):
    """The Starlette app; `cfg` is the run's config (its store, env settings and game specs)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    from ipr_dist.data.store import TrajectoryStore
    from ipr_dist.errors import UserError
    from ipr_dist.games import game_info, make_env
    from ipr_dist.games.catalog import load_annotations
    from ipr_dist.run_layout import RunLayout

    annotations = load_annotations(cfg.games.annotation_files)
    infos = {g: game_info(g, annotations, cfg.games.spec_files) for g in games}
    store = TrajectoryStore(RunLayout.of(cfg), cfg.store.compression)
    store.layout.makedirs("data")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipr-record-env")
    state: dict[str, Any] = {"session": None, "stopped": {}}  # stopped: session id -> session (taggable)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(worker, fn, *args)

    async def body(request: Request) -> dict:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY:
            raise RecordingError(f"request body of {size} bytes is over the {MAX_BODY} allowed")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise RecordingError(f"request body is over the {MAX_BODY} bytes allowed")
        try:
            data = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RecordingError("the body is not JSON") from None
        if not isinstance(data, dict):
            raise RecordingError("the body must be a JSON object")
        return data

    def authorised(request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):] if header.startswith("Bearer ") else request.query_params.get("token")
        if not given:
            return error(401, "missing token: open the URL `ipr record` printed (it carries ?token=...)")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return error(403, "wrong token")
        return None

    def current(data: dict) -> RecordingSession:
        s = state["session"]
        if s is None or data.get("session") != s.session:
            raise SessionConflict("no such session running; start one first")
        return s

    def endpoint(handler):
        async def wrapped(request: Request):
            denied = authorised(request)
            if denied is not None:
                return denied
            try:
                return JSONResponse(await handler(request))
            except SessionConflict as exc:
                return error(409, str(exc))
            except UserError as exc:
                return error(400, str(exc))
            except (TypeError, ValueError, KeyError) as exc:
                return error(400, f"malformed request ({type(exc).__name__}: {exc})")
        return wrapped

    async def index(request: Request):
        denied = authorised(request)
        if denied is not None:
            return HTMLResponse(f"<p>{json.loads(denied.body)['error']}</p>", status_code=denied.status_code)
        return HTMLResponse(PAGE)

    async def list_games(request: Request) -> dict:
        return {"player": player, "games": [
            {"id": g, "kind": i.kind, "keys": list(i.keys), "mouse": i.uses_mouse, "keymap": page_keymap(list(i.keys), i.kind),
             "controls": (i.annotation.controls if i.annotation else {}), "tags": tag_choices(i),
             "goal": i.annotation.goal if i.annotation else None} for g, i in infos.items()]}

    async def start(request: Request) -> dict:
        data = await body(request)
        game, who = str(data.get("game", "")), str(data.get("player") or player)
        if game not in infos:
            raise RecordingError(f"game {game!r} is not offered here; choose one of {sorted(infos)}")
        if state["session"] is not None:
            raise SessionConflict(f"a session is already running ({state['session'].game}); stop it first")

        def open_session():
            env = make_env(game, cfg.env, annotations, cfg.games.spec_files)
            try:
                s = RecordingSession(store, env, game, who, chunk_steps=cfg.record.chunk_steps)
            except BaseException:
                env.close()
                raise
            return s, _png(s.obs)

        s, frame = await run(open_session)
        state["session"] = s
        return {"session": s.session, "frame": frame, "score": float(s.info.get("score", 0.0)),
                "lives": int(s.info.get("lives", -1)), "step": 0}

    async def step(request: Request) -> dict:
        data = await body(request)
        s = current(data)
        action = s.action([str(k) for k in data.get("keys", [])], data.get("mouse", (0.5, 0.5)),
                          data.get("buttons", (0, 0, 0)), int(data.get("scroll", 0)))
        out = await run(s.step, action)
        out["frame"] = _png(s.obs)
        return out

    async def tag(request: Request) -> dict:
        """Tag steps of the running session, or of one stopped in this server's lifetime (the page's
        timeline after Stop): tags are kept apart from the committed steps, so they can come later."""
        data = await body(request)
        s = state["stopped"].get(data.get("session")) or current(data)
        t = await run(s.tag, int(data["start"]), int(data["end"]), str(data.get("text", "")))
        return {"episode_id": t.episode_id, "start": t.start, "end": t.end, "text": t.text}

    async def stop(request: Request) -> dict:
        data = await body(request)
        s = current(data)

        def finish():
            try:
                return s.stop()
            finally:
                s.env.close()

        state["session"] = None
        state["stopped"][s.session] = s
        return await run(finish)

    app = Starlette(routes=[
        Route("/", index),
        Route("/api/games", endpoint(list_games)),
        Route("/api/start", endpoint(start), methods=["POST"]),
        Route("/api/step", endpoint(step), methods=["POST"]),
        Route("/api/tag", endpoint(tag), methods=["POST"]),
        Route("/api/stop", endpoint(stop), methods=["POST"]),
    ])

    def shutdown() -> None:
        s = state["session"]
        if s is not None:  # a server stopped by the user (Ctrl-C) commits the session it was recording
            state["session"] = None
            worker.submit(lambda: (s.stop(), s.env.close())).result()
        worker.shutdown()

    app.state.shutdown = shutdown
    return app


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ipr record</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 16px; background: #f4f4f2; color: #222; }
 #screen { width: 512px; height: 512px; image-rendering: pixelated; background: #000; border: 1px solid #444; }
 .row { display: flex; gap: 16px; align-items: flex-start; } .panel { background: #fff; padding: 10px 12px; border: 1px solid #ccc; }
 #status { font-family: ui-monospace, monospace; } button { margin: 2px; } label { display: block; margin: 4px 0; }
 #keys td { padding: 0 8px 0 0; } #tags li { font-size: 0.9em; }
</style></head>
<body>
<h2>ipr record: play, and tag what happens</h2>
<div class="row">
 <div>
  <canvas id="screen" width="128" height="128" tabindex="0"></canvas>
  <div id="status">not playing</div>
 </div>
 <div class="panel" style="min-width: 320px">
  <label>Game <select id="game"></select></label>
  <label>Player <input id="player" size="16"></label>
  <button id="start">Start</button> <button id="stop" disabled>Stop</button>
  <p id="goal"></p>
  <table id="keys"></table>
  <h4>Tag a segment</h4>
  <button id="mark" disabled>Segment starts now</button>
  <label>Tag <select id="tagchoice"><option value="">(free text below)</option></select></label>
  <label>or text <input id="tagtext" size="28"></label>
  <button id="tag" disabled>Segment ends now: tag it</button>
  <div>or steps <input id="from" size="5"> to <input id="to" size="5"> <button id="tagrange" disabled>Tag these steps</button></div>
  <ul id="tags"></ul>
  <p id="message"></p>
 </div>
</div>
<script>
const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
let games = [], game = null, session = null, tagSession = null, running = false, held = new Set(), mark = null, lastStep = 0;
let mouse = [0.5, 0.5], hold = 0, click = 0, right = 0, scroll = 0;
async function api(path, body) {
  const r = await fetch(path, { method: body ? "POST" : "GET", headers: { "Authorization": "Bearer " + token,
    "Content-Type": "application/json" }, body: body ? JSON.stringify(body) : undefined });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
function show(frame) { const img = new Image(); img.onload = () => { const c = $("screen").getContext("2d"); c.imageSmoothingEnabled = false; c.drawImage(img, 0, 0, 128, 128); }; img.src = "data:image/png;base64," + frame; }
function selectGame() {
  game = games.find((g) => g.id === $("game").value);
  $("goal").textContent = game.goal ? "Goal: " + game.goal : "";
  $("keys").innerHTML = Object.entries(game.keymap).map(([k, v]) => `<tr><td><b>${k === " " ? "Space" : k}</b></td><td>${v}</td><td>${game.controls[v] || ""}</td></tr>`).join("") + (game.mouse ? "<tr><td><b>mouse</b></td><td colspan=2>move, click, hold, right-click, wheel</td></tr>" : "");
  $("tagchoice").innerHTML = '<option value="">(free text below)</option>' + game.tags.map((t) => `<option>${t}</option>`).join("");
}
async function tick() {
  if (!running) return;
  const pressed = [...held].map((k) => game.keymap[k]).filter((k) => k);
  try {
    const r = await api("/api/step", { session, keys: [...new Set(pressed)], mouse, buttons: [click, right, hold], scroll });
    click = 0; right = 0; scroll = 0; lastStep = r.step;
    show(r.frame);
    $("status").textContent = `step ${r.step}  score ${r.score}  lives ${r.lives < 0 ? "-" : r.lives}  time ${r.elapsed_s.toFixed(1)} s` + (r.done ? "  (episode over: a new one began)" : "");
  } catch (e) { $("message").textContent = e.message; running = false; return; }
  requestAnimationFrame(tick);
}
$("start").onclick = async () => {
  try {
    const r = await api("/api/start", { game: game.id, player: $("player").value });
    session = r.session; tagSession = r.session; running = true; held.clear(); lastStep = 0; show(r.frame);
    $("tagrange").disabled = false;
    $("start").disabled = true; $("stop").disabled = false; $("mark").disabled = false; $("tags").innerHTML = "";
    $("message").textContent = "recording: session " + session; $("screen").focus();
    requestAnimationFrame(tick);
  } catch (e) { $("message").textContent = e.message; }
};
$("stop").onclick = async () => {
  running = false;
  try {
    const r = await api("/api/stop", { session });
    $("message").textContent = `saved ${r.steps} steps in ${r.chunks} chunks, ${r.episodes} episodes, ${r.tags} tags`;
  } catch (e) { $("message").textContent = e.message; }
  $("start").disabled = false; $("stop").disabled = true; $("mark").disabled = true; $("tag").disabled = true; session = null;
};
async function addTag(start, end) {
  const text = $("tagtext").value.trim() || $("tagchoice").value;
  const r = await api("/api/tag", { session: tagSession, start, end, text });
  const li = document.createElement("li"); li.textContent = `steps ${r.start}-${r.end} of ${r.episode_id}: ${r.text}`; $("tags").appendChild(li);
  $("tagtext").value = "";
}
$("tagrange").onclick = async () => {
  try { await addTag(Number($("from").value), Number($("to").value)); } catch (e) { $("message").textContent = e.message; }
};
$("mark").onclick = () => { mark = lastStep; $("tag").disabled = false; $("screen").focus(); };
$("tag").onclick = async () => {
  try { await addTag(mark, Math.max(mark, lastStep - 1)); $("tag").disabled = true; } catch (e) { $("message").textContent = e.message; }
  $("screen").focus();
};
const canvas = $("screen");
canvas.addEventListener("keydown", (e) => { if (game && game.keymap[e.key] !== undefined) { held.add(e.key); e.preventDefault(); } });
canvas.addEventListener("keyup", (e) => { held.delete(e.key); });
canvas.addEventListener("blur", () => held.clear());
canvas.addEventListener("mousemove", (e) => { const r = canvas.getBoundingClientRect(); mouse = [(e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height]; });
canvas.addEventListener("mousedown", (e) => { if (e.button === 0) { hold = 1; click = 1; } });
canvas.addEventListener("mouseup", (e) => { if (e.button === 0) hold = 0; });
canvas.addEventListener("contextmenu", (e) => { right = 1; e.preventDefault(); });
canvas.addEventListener("wheel", (e) => { scroll = Math.sign(e.deltaY); e.preventDefault(); });
api("/api/games").then((r) => {
  games = r.games; $("player").value = r.player;
  $("game").innerHTML = games.map((g) => `<option>${g.id}</option>`).join(""); $("game").onchange = selectGame; selectGame();
}).catch((e) => { $("message").textContent = e.message; });
</script></body></html>
"""
