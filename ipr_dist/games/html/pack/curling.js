// Curling: friction and sliding. Press on the stone, pull back and release: it slides the other way
// and slows under friction (ice is slick, rough patches brake hard). Stop it near the house's centre.
IPR.run({
  init(g) {
    g.state.lives = 8; // stones left
    this.house = { x: 160, y: 60 };
    this.rough = [{ x: g.rand(40, 200), y: g.rand(90, 150), w: 80, h: 24 }];
    this.place();
  },
  place() { this.stone = { x: 160, y: 214, vx: 0, vy: 0, moving: false }; this.pull = null; },
  mu(x, y) { return this.rough.some((r) => x > r.x && x < r.x + r.w && y > r.y && y < r.y + r.h) ? 1.6 : 0.12; },
  update(dt, g) {
    const s = this.stone, inp = g.input;
    if (!s.moving) {
      if (inp.down && Math.hypot(inp.x - s.x, inp.y - s.y) < 40) this.pull = { x: inp.x, y: inp.y };
      else if (inp.down && this.pull) this.pull = { x: inp.x, y: inp.y };
      if (inp.released && this.pull) {
        const dx = s.x - this.pull.x, dy = s.y - this.pull.y;
        s.vx = dx * 3.2; s.vy = dy * 3.2; s.moving = Math.hypot(dx, dy) > 3; this.pull = null;
        if (s.moving) g.state.lives -= 1;
      }
      return;
    }
    const v = Math.hypot(s.vx, s.vy), decel = this.mu(s.x, s.y) * 98 * dt; // friction: a = mu * g
    if (v <= decel) { s.vx = s.vy = 0; } else { s.vx -= (s.vx / v) * decel; s.vy -= (s.vy / v) * decel; }
    s.x += s.vx * dt; s.y += s.vy * dt;
    if (s.x < 6 || s.x > g.W - 6) { s.vx = -0.5 * s.vx; s.x = g.clamp(s.x, 6, g.W - 6); }
    const out = s.y < -10 || s.y > g.H + 10;
    if (out || (s.vx === 0 && s.vy === 0)) {
      const d = Math.hypot(s.x - this.house.x, s.y - this.house.y);
      if (!out) g.state.score += d < 10 ? 3 : d < 22 ? 2 : d < 36 ? 1 : 0;
      if (g.state.lives <= 0) { g.state.gameOver = true; return; }
      this.place();
    }
  },
  render(ctx, g) {
    g.rect(0, 0, g.W, g.H, "#dfeef5");
    for (const r of this.rough) g.rect(r.x, r.y, r.w, r.h, "#b9a98f");
    g.circle(this.house.x, this.house.y, 36, "#4a7bd0"); g.circle(this.house.x, this.house.y, 22, "#ffffff");
    g.circle(this.house.x, this.house.y, 10, "#d04a4a");
    if (this.pull) g.line(this.stone.x, this.stone.y, this.pull.x, this.pull.y, "#333333", 1);
    g.circle(this.stone.x, this.stone.y, 7, "#555555");
  },
  background: "#dfeef5",
  hud: "#222222",
});
