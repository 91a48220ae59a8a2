// Drift: inertia and momentum. A ship keeps its velocity; rotate and thrust to collect stars and
// avoid drifting rocks.
IPR.run({
  init(g) {
    this.s = { x: 160, y: 120, vx: 0, vy: 0, a: -Math.PI / 2, inv: 0 };
    this.rocks = []; for (let i = 0; i < 4; i++) this.rocks.push(this.rock(g));
    this.star = { x: g.rand(20, 300), y: g.rand(30, 220) };
  },
  rock(g) {
    const side = g.random() < 0.5;
    return { x: side ? 0 : g.rand(0, g.W), y: side ? g.rand(0, g.H) : 0, vx: g.rand(-50, 50), vy: g.rand(-50, 50), r: g.rand(7, 14) };
  },
  update(dt, g) {
    const s = this.s, k = g.input.keys;
    if (k.has("ArrowLeft")) s.a -= 3.5 * dt;
    if (k.has("ArrowRight")) s.a += 3.5 * dt;
    if (k.has("ArrowUp")) { s.vx += Math.cos(s.a) * 140 * dt; s.vy += Math.sin(s.a) * 140 * dt; } // F = ma
    s.x += s.vx * dt; s.y += s.vy * dt;
    if (s.x < 6 || s.x > g.W - 6) { s.vx = -0.6 * s.vx; s.x = g.clamp(s.x, 6, g.W - 6); }
    if (s.y < 6 || s.y > g.H - 6) { s.vy = -0.6 * s.vy; s.y = g.clamp(s.y, 6, g.H - 6); }
    s.inv = Math.max(0, s.inv - dt);
    for (const r of this.rocks) {
      r.x = (r.x + r.vx * dt + g.W) % g.W; r.y = (r.y + r.vy * dt + g.H) % g.H;
      if (s.inv === 0 && Math.hypot(r.x - s.x, r.y - s.y) < r.r + 5) { g.loseLife(); s.inv = 1.5; }
    }
    if (Math.hypot(this.star.x - s.x, this.star.y - s.y) < 9) {
      g.state.score += 1; this.star = { x: g.rand(20, 300), y: g.rand(30, 220) };
      if (this.rocks.length < 9) this.rocks.push(this.rock(g));
    }
  },
  render(ctx, g) {
    g.circle(this.star.x, this.star.y, 4, "#f2e94e");
    for (const r of this.rocks) g.circle(r.x, r.y, r.r, "#8a7f73");
    const s = this.s, c = Math.cos(s.a), n = Math.sin(s.a);
    const col = s.inv > 0 ? "#666666" : "#8fd3ff";
    g.line(s.x + c * 8, s.y + n * 8, s.x - c * 6 - n * 5, s.y - n * 6 + c * 5, col, 2);
    g.line(s.x + c * 8, s.y + n * 8, s.x - c * 6 + n * 5, s.y - n * 6 - c * 5, col, 2);
    if (g.input.keys.has("ArrowUp")) g.circle(s.x - c * 8, s.y - n * 8, 2, "#ff8030");
  },
});
