// Billiards: elastic collisions and momentum transfer. Hold the mouse to aim from the cue ball
// toward the pointer; the longer you hold, the harder the strike on release. Pot the coloured balls;
// potting the cue ball costs a life.
IPR.run({
  init(g) { this.rack(g); this.cue = { x: 80, y: 120, vx: 0, vy: 0, r: 6 }; this.charge = 0; },
  rack(g) {
    this.balls = [];
    for (let i = 0; i < 6; i++) this.balls.push({ x: 200 + (i % 3) * 13 + g.rand(-1, 1), y: 108 + Math.floor(i / 3) * 13 + (i % 3) * 4, vx: 0, vy: 0, r: 6 });
  },
  pockets: [[12, 22], [160, 18], [308, 22], [12, 228], [160, 232], [308, 228]],
  all() { return [this.cue, ...this.balls]; },
  still() { return this.all().every((b) => Math.hypot(b.vx, b.vy) < 1); },
  update(dt, g) {
    const inp = g.input, cue = this.cue;
    if (this.still()) {
      if (inp.down) this.charge = Math.min(this.charge + dt, 1.5);
      if (inp.released && this.charge > 0) {
        const dx = inp.x - cue.x, dy = inp.y - cue.y, d = Math.hypot(dx, dy) || 1, v = 120 + 260 * this.charge;
        cue.vx = (v * dx) / d; cue.vy = (v * dy) / d; this.charge = 0;
      }
    }
    const bs = this.all();
    for (const b of bs) {
      const v = Math.hypot(b.vx, b.vy), f = 60 * dt; // rolling friction
      if (v <= f) b.vx = b.vy = 0; else { b.vx -= (b.vx / v) * f; b.vy -= (b.vy / v) * f; }
      b.x += b.vx * dt; b.y += b.vy * dt;
      if (b.x < 14 || b.x > g.W - 14) { b.vx = -0.9 * b.vx; b.x = g.clamp(b.x, 14, g.W - 14); }
      if (b.y < 24 || b.y > g.H - 14) { b.vy = -0.9 * b.vy; b.y = g.clamp(b.y, 24, g.H - 14); }
    }
    for (let i = 0; i < bs.length; i++) for (let j = i + 1; j < bs.length; j++) {
      const a = bs[i], b = bs[j], dx = b.x - a.x, dy = b.y - a.y, d = Math.hypot(dx, dy);
      if (d > 0 && d < a.r + b.r) { // equal masses: exchange the normal velocity components
        const nx = dx / d, ny = dy / d, rel = (a.vx - b.vx) * nx + (a.vy - b.vy) * ny;
        if (rel > 0) { a.vx -= rel * nx; a.vy -= rel * ny; b.vx += rel * nx; b.vy += rel * ny; }
        const push = (a.r + b.r - d) / 2; a.x -= nx * push; a.y -= ny * push; b.x += nx * push; b.y += ny * push;
      }
    }
    const potted = (b) => this.pockets.some(([px, py]) => Math.hypot(b.x - px, b.y - py) < 10);
    const before = this.balls.length;
    this.balls = this.balls.filter((b) => !potted(b));
    g.state.score += before - this.balls.length;
    if (potted(cue)) { g.loseLife(); Object.assign(cue, { x: 80, y: 120, vx: 0, vy: 0 }); }
    if (this.balls.length === 0) this.rack(g);
  },
  render(ctx, g) {
    g.rect(6, 16, g.W - 12, g.H - 22, "#1d6b3a");
    for (const [px, py] of this.pockets) g.circle(px, py, 9, "#000000");
    for (const b of this.balls) g.circle(b.x, b.y, b.r, "#d04a4a");
    g.circle(this.cue.x, this.cue.y, this.cue.r, "#ffffff");
    if (this.still()) g.line(this.cue.x, this.cue.y, g.input.x, g.input.y, "rgba(255,255,255,0.5)", 1);
    if (this.charge > 0) g.rect(g.W - 60, 4, this.charge * 36, 4, "#f2e94e");
  },
  background: "#5a3a1a",
});
