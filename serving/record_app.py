"""`ipr record RUN`: a local web page where a person plays a game and tags what happens; every step
goes to the run's store with source `human` (ipr_dist/data/recording.py).

Retro and desktop games run server-side in the fleet's own environment, one step per request from
the page: the page sends the keys and pointer it holds, the server steps the env and answers with
the frame, score, lives and elapsed time. HTML games run in the person's own page (`record.
html_in_page`): the server serves the game's files with the env's virtual clock and bridge put in
front of its scripts (/play/<capability>/...), the page steps it one 16 ms frame per animation frame
through the bridge, shows the game itself, and uploads the bridge's answers in batches
(/api/upload); the server reads them as the env does. So a step is always one game frame (retro:
native rate; HTML: 16 ms of virtual time, 60 FPS), whatever the network or the person's machine does.

Served on 127.0.0.1 with a token: the page's URL carries it (`/?token=...`) and the page sends it as
`Authorization: Bearer` on every call. The game is served from the other loopback name (localhost
when the page is on 127.0.0.1, and the reverse), a different origin, so a game cannot read the page's
token; its files are reachable only through the running session's unguessable capability path.

Every env call runs on one thread (Playwright's sync API and stable-retro's emulator are bound to
the thread that made them); one session at a time.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import re
import secrets
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlencode, urlparse

import numpy as np

from ipr_dist.data.recording import EnvSession, PageSession, RecordingError, RecordingSession, SessionConflict
from ipr_dist.games.html_spec import HTML_DIR

MAX_BODY = 64 * 1024  # every request of the page but an upload of in-page steps is small
RELAY_JS = (HTML_DIR / "relay.js").read_text()


class BodyTooLarge(RecordingError):
    """A request body over the size the endpoint takes (413)."""


def other_loopback(netloc: str) -> str:
    """The page's host:port with the other loopback name: the game's own origin, apart from the page's."""
    host, _, port = netloc.rpartition(":") if netloc.count(":") == 1 else (netloc, "", "")
    other = "localhost" if host in ("127.0.0.1", "[::1]") else "127.0.0.1"
    return f"{other}:{port}" if port else other


def inject_scripts(html: str, parent_origin: str) -> str:
    """The game's HTML with the virtual clock, the bridge and the relay run before any of its scripts."""
    from ipr_dist.games.html_env import PAGE_SCRIPTS

    code = PAGE_SCRIPTS + "\n" + RELAY_JS.replace("__PARENT_ORIGIN__", json.dumps(parent_origin))
    assert "</script" not in code.lower()  # our own scripts: they can sit inside one <script> element
    tag = "<script>" + code + "</script>"
    for pattern in (r"<head\b[^>]*>", r"<html\b[^>]*>", r"<!doctype[^>]*>"):
        m = re.search(pattern, html, re.I)
        if m:
            return html[:m.end()] + tag + html[m.end():]
    return tag + html


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
    from ipr_dist.games.specs import find_game_spec
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

    async def body(request: Request, limit: int = MAX_BODY) -> dict:
        size = int(request.headers.get("content-length") or 0)
        if size > limit:
            raise BodyTooLarge(f"request body of {size} bytes is over the {limit} allowed")
        raw = bytearray()
        async for part in request.stream():  # counted as it arrives: a body without a length is cut off too
            raw += part
            if len(raw) > limit:
                raise BodyTooLarge(f"request body is over the {limit} bytes allowed")
        try:
            data = json.loads(bytes(raw) or b"{}")
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

    def taggable(data: dict) -> RecordingSession:
        """The running session, or one stopped in this server's lifetime (its tags and timeline stay open)."""
        return state["stopped"].get(data.get("session")) or current(data)

    def endpoint(handler):
        async def wrapped(request: Request):
            denied = authorised(request)
            if denied is not None:
                return denied
            try:
                return JSONResponse(await handler(request))
            except SessionConflict as exc:
                return error(409, str(exc))
            except BodyTooLarge as exc:
                return error(413, str(exc))
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
            if data.get("replace") is not True:
                raise SessionConflict(f"a session is already running ({state['session'].game}, player "
                                      f"{state['session'].player}); stop it first, or start with replace")
            await finish(state["session"])  # left running by a closed tab: committed, then replaced
        if infos[game].kind == "html" and cfg.record.html_in_page:
            from ipr_dist.games.html_env import HtmlReadout

            spec = find_game_spec(game, cfg.games.spec_files)
            s = PageSession(store, infos[game], who, chunk_steps=cfg.record.chunk_steps,
                            readout=HtmlReadout(spec, cfg.env.frame_size), failure_on=cfg.env.failure_on,
                            max_episode_steps=cfg.env.max_episode_steps)
            s.capability = secrets.token_urlsafe(24)
            s.page_origin = f"{request.url.scheme}://{request.url.netloc}"
            s.play_origin = f"{request.url.scheme}://{other_loopback(request.url.netloc)}"
            state["session"] = s
            return {"session": s.session, "mode": "page", "bridge": s.readout.config, "keys": s.keys,
                    "next": play_next(s, {"episode": 0, "seed": s.page_seed()}), "step": 0}

        def open_session():
            env = make_env(game, cfg.env, annotations, cfg.games.spec_files)
            try:
                return EnvSession(store, env.game, who, chunk_steps=cfg.record.chunk_steps, env=env)
            except BaseException:
                env.close()
                raise

        s = await run(open_session)
        state["session"] = s
        return {"session": s.session, "mode": "server", "frame": _png(s.obs), "score": float(s.info.get("score", 0.0)),
                "lives": int(s.info.get("lives", -1)), "step": 0}

    def play_next(s: PageSession, nxt: dict | None) -> dict | None:
        """The next episode's number, seed and the URL its page loads (the seed in the game's own parameter)."""
        if nxt is None:
            return None
        spec = s.readout.spec
        query = f"?{urlencode({spec.seed_param: nxt['seed']})}" if nxt["seed"] is not None else ""
        entry = urlparse(spec.url).path.lstrip("/") if spec.url else spec.entry_path.name
        return {**nxt, "url": f"{s.play_origin}/play/{s.capability}/{entry}{query}"}

    async def step(request: Request) -> dict:
        data = await body(request)
        s = current(data)
        if isinstance(s, PageSession):
            raise RecordingError(f"{s.game} is played in the page; its steps come by /api/upload")
        action = s.action(data.get("keys", []), data.get("mouse", (0.5, 0.5)),
                          data.get("buttons", (0, 0, 0)), int(data.get("scroll", 0)))
        out = await run(s.step, action)
        out["frame"] = _png(s.obs)
        return out

    async def upload(request: Request) -> dict:
        """A batch of steps played in the page (PageSession.upload says what it holds)."""
        data = await body(request, cfg.record.max_upload_bytes)
        s = current(data)
        if not isinstance(s, PageSession):
            raise RecordingError(f"{s.game} is played on the server; send its steps to /api/step")
        out = await run(s.upload, data)
        out["next"] = play_next(s, out["next"])
        return out

    async def play(request: Request):
        """The running in-page session's game files, by its capability path; HTML gets the clock, the
        bridge and the relay in front of the game's own scripts."""
        from starlette.responses import Response

        s = state["session"]
        if not isinstance(s, PageSession) or not hmac.compare_digest(request.path_params["cap"], s.capability):
            return Response(b"no such game session", status_code=404)
        rel, spec = unquote(request.path_params["path"]), s.readout.spec
        if spec.url:
            origin = urlparse(spec.url)
            target = f"{origin.scheme}://{origin.netloc}/{rel}" + (f"?{request.url.query}" if request.url.query else "")
            try:
                with urllib.request.urlopen(target, timeout=30) as r:  # the spec's own local origin only
                    content, ctype = r.read(), r.headers.get_content_type()
            except urllib.error.HTTPError as exc:
                return Response(b"not found", status_code=exc.code)
            except OSError as exc:
                return Response(f"cannot reach {target}: {exc}".encode(), status_code=502)
        else:
            found = spec.read_file(rel)
            if found is None:
                return Response(b"not found", status_code=404)
            content, ctype = found
        if ctype == "text/html":
            content = inject_scripts(content.decode("utf-8", "replace"), s.page_origin).encode()
        return Response(content, media_type=ctype, headers={"Cache-Control": "no-store"})

    async def tag(request: Request) -> dict:
        """Tag steps of the running session, or of one stopped in this server's lifetime (the page's
        timeline after Stop): tags are kept apart from the committed steps, so they can come later."""
        data = await body(request)
        s = taggable(data)
        t = await run(s.tag, int(data["start"]), int(data["end"]), str(data.get("text", "")))
        return {"episode_id": t.episode_id, "start": t.start, "end": t.end, "text": t.text}

    async def timeline(request: Request) -> dict:
        """The session's timeline (running, or stopped in this server's lifetime): a thumbnail of every
        THUMB_EVERY-th step, so a person can pick a segment to tag by its pictures."""
        data = await body(request)
        s = taggable(data)
        return {"steps": s.steps, "thumbnails": [{"step": step, "png": _png(img)} for step, img in list(s.thumbnails)]}

    async def finish(s: RecordingSession) -> dict:
        """Commit what the session has left and release its env; it stays taggable."""
        def close():
            try:
                return s.stop()
            finally:
                s.close()

        state["session"] = None
        state["stopped"][s.session] = s
        return await run(close)

    async def stop(request: Request) -> dict:
        return await finish(current(await body(request)))

    app = Starlette(routes=[
        Route("/", index),
        Route("/api/games", endpoint(list_games)),
        Route("/api/start", endpoint(start), methods=["POST"]),
        Route("/api/step", endpoint(step), methods=["POST"]),
        Route("/api/upload", endpoint(upload), methods=["POST"]),
        Route("/play/{cap}/{path:path}", play),
        Route("/api/tag", endpoint(tag), methods=["POST"]),
        Route("/api/timeline", endpoint(timeline), methods=["POST"]),
        Route("/api/stop", endpoint(stop), methods=["POST"]),
    ])

    def shutdown() -> None:
        s = state["session"]
        if s is not None:  # a server stopped by the user (Ctrl-C) commits the session it was recording
            state["session"] = None
            worker.submit(lambda: (s.stop(), s.close())).result()
        worker.shutdown()

    app.state.shutdown = shutdown
    return app


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ipr record</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 16px; background: #f4f4f2; color: #222; }
 #screen { position: relative; width: 512px; height: 512px; background: #000; border: 1px solid #444; overflow: hidden; }
 #screen:focus { outline: 3px solid #4a8; } #frame { width: 100%; height: 100%; image-rendering: pixelated; }
 #gameframe { width: 640px; height: 480px; border: 0; pointer-events: none; display: none; background: #fff; }
 .row { display: flex; gap: 16px; align-items: flex-start; } .panel { background: #fff; padding: 10px 12px; border: 1px solid #ccc; }
 #status { font-family: ui-monospace, monospace; } button { margin: 2px; } label { display: block; margin: 4px 0; }
 #keys td { padding: 0 8px 0 0; } #tags li { font-size: 0.9em; }
 #timeline { max-width: 560px; max-height: 150px; overflow-y: auto; } #timeline img { width: 32px; height: 32px; margin: 1px; cursor: pointer; image-rendering: pixelated; border: 2px solid transparent; }
 #timeline img.sel { border-color: #4a8; }
</style></head>
<body>
<h2>ipr record: play, and tag what happens</h2>
<div class="row">
 <div>
  <div id="screen" tabindex="0"><canvas id="frame" width="128" height="128"></canvas><iframe id="gameframe" tabindex="-1" title="game"></iframe></div>
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
  <div>Timeline (click a picture for the first step, another for the last): <button id="refresh" disabled>show</button></div>
  <div id="timeline"></div>
  <ul id="tags"></ul>
  <p id="message"></p>
 </div>
</div>
<script>
// Retro and desktop games: one /api/step per frame, the server's frame drawn on #frame.
// HTML games ("page" mode): the game runs in #gameframe under the env's virtual clock; each animation
// frame of this page steps it once through its bridge (postMessage to the relay), and the bridge's
// answers go to /api/upload in batches of BATCH steps. The server decides when an episode ends and
// gives the next one's URL; steps played meanwhile are dropped.
const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
const BATCH = 8, NO_ACTION = { keys: [], mouse: [0.5, 0.5], mouse_buttons: [0, 0, 0], scroll: 0 };
let games = [], game = null, session = null, tagSession = null, running = false, held = new Set(), mark = null, lastStep = 0;
let pointer = null, hold = 0, click = 0, right = 0, scroll = 0, mode = null, t0 = 0;
let bridgeCfg = null, playOrigin = null, canvasRect = null, episode = 0, epBase = 0, epStep = 0, pending = [];
let resetAnswer = null, resetSent = false, loading = false, stepping = null, uploading = Promise.resolve(), lastScore = 0;
const calls = new Map(); let callId = 0;
async function api(path, body) {
  const r = await fetch(path, { method: body ? "POST" : "GET", headers: { "Authorization": "Bearer " + token,
    "Content-Type": "application/json" }, body: body ? JSON.stringify(body) : undefined });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
function fail(message) { $("message").textContent = message; running = false; }
function show(frame) { const img = new Image(); img.onload = () => { const c = $("frame").getContext("2d"); c.imageSmoothingEnabled = false; c.drawImage(img, 0, 0, 128, 128); }; img.src = "data:image/png;base64," + frame; }
function status(step, score, lives, elapsed, done) {
  $("status").textContent = `step ${step}  score ${score}  lives ${lives < 0 ? "-" : lives}  time ${elapsed.toFixed(1)} s` + (done ? "  (episode over: a new one began)" : "");
}
function selectGame() {
  game = games.find((g) => g.id === $("game").value);
  $("goal").textContent = game.goal ? "Goal: " + game.goal : "";
  $("keys").innerHTML = Object.entries(game.keymap).map(([k, v]) => `<tr><td><b>${k === " " ? "Space" : k}</b></td><td>${v}</td><td>${game.controls[v] || ""}</td></tr>`).join("") + (game.mouse ? "<tr><td><b>mouse</b></td><td colspan=2>move, click, hold, right-click, wheel</td></tr>" : "");
  $("tagchoice").innerHTML = '<option value="">(free text below)</option>' + game.tags.map((t) => `<option>${t}</option>`).join("");
}
function pressedKeys() { return [...new Set([...held].map((k) => game.keymap[k]).filter((k) => k))]; }
function pointerAt() {  // [0, 1]^2 over the game's picture: the in-page game's canvas, or the server's frame
  if (!pointer) return [0.5, 0.5];
  const r = $("screen").getBoundingClientRect();
  const [x0, y0, w, h] = mode === "page" && canvasRect ? canvasRect : [0, 0, r.width, r.height];
  const clip = (v) => Math.min(1, Math.max(0, v));
  return [clip((pointer[0] - r.left - x0) / w), clip((pointer[1] - r.top - y0) / h)];
}
function takeButtons() { const b = [click, right, hold], s = scroll; click = 0; right = 0; scroll = 0; return [b, s]; }
async function tick() {
  if (!running) return;
  const [buttons, sc] = takeButtons();
  try {
    const r = await api("/api/step", { session, keys: pressedKeys(), mouse: pointerAt(), buttons, scroll: sc });
    lastStep = r.step;
    show(r.frame);
    status(r.step, r.score, r.lives, r.elapsed_s, r.done);
  } catch (e) { fail(e.message); return; }
  requestAnimationFrame(tick);
}
// --- HTML games in this page -------------------------------------------------------------------
window.addEventListener("message", (e) => {
  if (e.origin !== playOrigin || !e.data) return;
  if (e.data.id === null) { fail("the game threw a JavaScript error: " + e.data.error); return; }
  const c = calls.get(e.data.id);
  if (!c) return;
  calls.delete(e.data.id);
  if (e.data.error !== undefined) c.reject(new Error("the game threw a JavaScript error: " + e.data.error)); else c.resolve(e.data.result);
});
function callGame(call, arg) {
  return new Promise((resolve, reject) => {
    const id = ++callId;
    calls.set(id, { resolve, reject });
    $("gameframe").contentWindow.postMessage({ id, call, arg }, playOrigin);
  });
}
async function beginEpisode(next, base) {
  loading = true; episode = next.episode; epBase = base; epStep = 0; pending = []; resetSent = false;
  for (const c of calls.values()) c.reject(null);  // calls into the page being replaced never answer
  calls.clear();
  const frame = $("gameframe");
  await new Promise((resolve) => { frame.onload = resolve; frame.src = next.url; });
  const setup = await callGame("setup", bridgeCfg);
  if (setup.error) throw new Error(setup.error);
  canvasRect = setup.rect;
  $("screen").focus();
  resetAnswer = await callGame("step", NO_ACTION);
  loading = false;
}
function flush() {  // send the steps played since the last batch; uploads go one after another, in order
  if (!pending.length) return uploading;
  const batch = { session, episode, first: epStep - pending.length, steps: pending };
  if (!resetSent) { batch.reset = resetAnswer; resetSent = true; }
  pending = [];
  uploading = uploading.then(() => api("/api/upload", batch)).then((r) => {
    if (r.next && r.next.episode > episode && running) beginEpisode(r.next, r.step).catch((e) => e && fail(e.message));
  }, (e) => fail(e.message));
  return uploading;
}
async function pageStep() {
  const ep = episode, keys = pressedKeys(), mouse = pointerAt(), [buttons, sc] = takeButtons();
  const a = { keys: game.keys.map((k) => (keys.includes(k) ? 1 : 0)), mouse, mouse_buttons: buttons, scroll: sc };
  const answer = await callGame("step", a);
  if (ep !== episode || !running) return;  // the server ended this episode meanwhile: not recorded
  pending.push({ keys, mouse, buttons, scroll: sc, t_ms: Math.round(performance.now() - t0), answer });
  epStep += 1; lastStep = epBase + epStep;
  if (typeof answer.vars.score === "number") lastScore = answer.vars.score;
  const lives = typeof answer.vars.lives === "number" ? answer.vars.lives : -1;
  status(lastStep, lastScore, lives, (performance.now() - t0) / 1000, false);
  if (pending.length >= BATCH) flush();
}
function pageTick() {
  if (!running) return;
  if (!loading && !stepping) {
    stepping = pageStep().catch((e) => e && fail(e.message)).finally(() => { stepping = null; });
  }
  requestAnimationFrame(pageTick);
}
// --- controls ------------------------------------------------------------------------------------
$("start").onclick = async () => {
  try {
    let r;
    try { r = await api("/api/start", { game: game.id, player: $("player").value }); }
    catch (e) {  // a session left running (a closed tab): the person may save it and start anew
      if (!e.message.startsWith("a session is already running") || !confirm(e.message + ". Save it and start a new one?")) throw e;
      r = await api("/api/start", { game: game.id, player: $("player").value, replace: true });
    }
    session = r.session; tagSession = r.session; mode = r.mode; held.clear(); lastStep = 0; lastScore = 0; t0 = performance.now();
    $("frame").style.display = mode === "page" ? "none" : "block";
    $("gameframe").style.display = mode === "page" ? "block" : "none";
    $("screen").style.width = mode === "page" ? "640px" : "512px";
    $("screen").style.height = mode === "page" ? "480px" : "512px";
    $("tagrange").disabled = false; $("refresh").disabled = false; $("timeline").innerHTML = "";
    $("start").disabled = true; $("stop").disabled = false; $("mark").disabled = false; $("tags").innerHTML = "";
    $("message").textContent = "recording: session " + session + (mode === "page" ? " (the game runs in this page)" : "");
    $("screen").focus();
    running = true;
    if (mode === "page") {
      bridgeCfg = r.bridge; playOrigin = new URL(r.next.url).origin; uploading = Promise.resolve();
      await beginEpisode(r.next, 0);
      requestAnimationFrame(pageTick);
    } else {
      show(r.frame);
      requestAnimationFrame(tick);
    }
  } catch (e) { if (e) fail(e.message); }
};
$("stop").onclick = async () => {
  running = false;
  try {
    if (mode === "page") { await stepping; flush(); await uploading; }
    const r = await api("/api/stop", { session });
    $("message").textContent = `saved ${r.steps} steps in ${r.chunks} chunks, ${r.episodes} episodes, ${r.tags} tags`;
    await showTimeline();
  } catch (e) { $("message").textContent = e.message; }
  $("start").disabled = false; $("stop").disabled = true; $("mark").disabled = true; $("tag").disabled = true; session = null;
};
async function addTag(start, end) {
  if (mode === "page" && session) { flush(); await uploading; }  // the tagged steps must have reached the server
  const text = $("tagtext").value.trim() || $("tagchoice").value;
  const r = await api("/api/tag", { session: tagSession, start, end, text });
  const li = document.createElement("li"); li.textContent = `steps ${r.start}-${r.end} of ${r.episode_id}: ${r.text}`; $("tags").appendChild(li);
  $("tagtext").value = "";
}
$("tagrange").onclick = async () => {
  try { await addTag(Number($("from").value), Number($("to").value)); } catch (e) { $("message").textContent = e.message; }
};
let pickFirst = true;
async function showTimeline() {
  if (mode === "page" && session) { flush(); await uploading; }
  const r = await api("/api/timeline", { session: tagSession });
  $("timeline").innerHTML = "";
  for (const t of r.thumbnails) {
    const img = new Image(); img.src = "data:image/png;base64," + t.png; img.title = "step " + t.step; img.dataset.step = t.step;
    img.onclick = () => {
      if (pickFirst) { $("from").value = t.step; $("to").value = t.step; document.querySelectorAll("#timeline img").forEach((i) => i.classList.remove("sel")); }
      else { $("to").value = Math.max(t.step, Number($("from").value)); }
      img.classList.add("sel"); pickFirst = !pickFirst;
    };
    $("timeline").appendChild(img);
  }
}
$("refresh").onclick = () => showTimeline().catch((e) => { $("message").textContent = e.message; });
$("mark").onclick = () => { mark = lastStep; $("tag").disabled = false; $("screen").focus(); };
$("tag").onclick = async () => {
  const end = Math.max(mark, lastStep - 1);
  try { await addTag(mark, end); $("tag").disabled = true; } catch (e) { $("message").textContent = e.message; }
  $("screen").focus();
};
const screen_ = $("screen");
screen_.addEventListener("keydown", (e) => { if (game && game.keymap[e.key] !== undefined) { held.add(e.key); e.preventDefault(); } });
screen_.addEventListener("keyup", (e) => { held.delete(e.key); });
screen_.addEventListener("blur", () => held.clear());
screen_.addEventListener("mousemove", (e) => { pointer = [e.clientX, e.clientY]; });
screen_.addEventListener("mousedown", (e) => { pointer = [e.clientX, e.clientY]; if (e.button === 0) { hold = 1; click = 1; } });
screen_.addEventListener("mouseup", (e) => { if (e.button === 0) hold = 0; });
screen_.addEventListener("contextmenu", (e) => { right = 1; e.preventDefault(); });
screen_.addEventListener("wheel", (e) => { scroll = Math.sign(e.deltaY); e.preventDefault(); });
api("/api/games").then((r) => {
  games = r.games; $("player").value = r.player;
  $("game").innerHTML = games.map((g) => `<option>${g.id}</option>`).join(""); $("game").onchange = selectGame; selectGame();
}).catch((e) => { $("message").textContent = e.message; });
</script></body></html>
"""
