// ipr-dist game harness: one small shared layer under every game of the pack.
// It owns the fixed-step loop (one update per animation frame, dt = 1/60 s, so a page driven by a
// virtual clock is deterministic), input (keys held / pressed this frame, pointer position in canvas
// pixels, button held / clicked / released, wheel), a seeded RNG (?seed=N in the URL), and the
// variables the environment reads: window.ipr = {score, lives, gameOver}. A person can play every
// game in a normal browser too.
(function () {
  "use strict";
  const params = new URLSearchParams(location.search);
  let s = (parseInt(params.get("seed") || "0", 10) >>> 0) ^ 0x9e3779b9;
  function random() { // mulberry32
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  const state = { score: 0, lives: 3, gameOver: false };
  const input = {
    keys: new Set(), pressed: new Set(),
    x: 0, y: 0, down: false, clicked: false, released: false, rightClicked: false, wheel: 0,
  };
  window.ipr = state;

  function run(game) {
    const canvas = document.getElementById("game");
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height;
    const toCanvas = (e) => {
      const r = canvas.getBoundingClientRect();
      input.x = (e.clientX - r.left) * (W / r.width);
      input.y = (e.clientY - r.top) * (H / r.height);
    };
    window.addEventListener("keydown", (e) => {
      if (!input.keys.has(e.key)) input.pressed.add(e.key);
      input.keys.add(e.key);
      if (e.key.startsWith("Arrow") || e.key === " ") e.preventDefault();
    });
    window.addEventListener("keyup", (e) => input.keys.delete(e.key));
    canvas.addEventListener("mousemove", toCanvas);
    canvas.addEventListener("mousedown", (e) => {
      toCanvas(e);
      if (e.button === 0) input.down = true;
    });
    window.addEventListener("mouseup", (e) => {
      if (e.button === 0 && input.down) { input.down = false; input.released = true; }
    });
    canvas.addEventListener("click", (e) => { toCanvas(e); input.clicked = true; });
    canvas.addEventListener("contextmenu", (e) => { e.preventDefault(); toCanvas(e); input.rightClicked = true; });
    canvas.addEventListener("wheel", (e) => { e.preventDefault(); input.wheel += Math.sign(e.deltaY); }, { passive: false });

    const api = {
      W, H, state, input, random,
      rand: (a, b) => a + (b - a) * random(),
      randint: (a, b) => Math.floor(a + (b - a + 1) * random()),
      clamp: (v, a, b) => Math.max(a, Math.min(b, v)),
      loseLife() {
        state.lives -= 1;
        if (state.lives <= 0) { state.lives = 0; state.gameOver = true; }
      },
      circle(x, y, r, color) { ctx.fillStyle = color; ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.fill(); },
      rect(x, y, w, h, color) { ctx.fillStyle = color; ctx.fillRect(x, y, w, h); },
      line(x1, y1, x2, y2, color, width) {
        ctx.strokeStyle = color; ctx.lineWidth = width || 1;
        ctx.beginPath(); ctx.moveTo(x1, y1); ctx.lineTo(x2, y2); ctx.stroke();
      },
    };
    game.init(api);
    function frame() {
      if (!state.gameOver) game.update(1 / 60, api);
      ctx.fillStyle = game.background || "#101820";
      ctx.fillRect(0, 0, W, H);
      game.render(ctx, api);
      ctx.fillStyle = game.hud || "#ffffff";
      ctx.font = "10px monospace";
      ctx.fillText("score " + Math.floor(state.score) + "  lives " + state.lives, 4, 11);
      if (state.gameOver) { ctx.font = "16px monospace"; ctx.fillText("GAME OVER", W / 2 - 40, H / 2); }
      input.pressed.clear();
      input.clicked = input.released = input.rightClicked = false;
      input.wheel = 0;
      requestAnimationFrame(frame);
    }
    requestAnimationFrame(frame);
  }
  window.IPR = { run, random, state, input };
})();
