// Throw: drag and throw. Grab a crate with the mouse, drag it and let go: it flies with the hand's
// velocity and falls under gravity. Land crates in the bin; a crate that hits the floor too fast
// breaks and costs a life.
IPR.run({
  init(g) { this.crates = []; this.held = null; this.last = { x: 0, y: 0 }; this.refill(g); },
  bin: { x: 250, w: 50, y: 180 },
  refill(g) { while (this.crates.length < 3) this.crates.push({ x: g.rand(20, 120), y: 216, vx: 0, vy: 0, s: 12 }); },
  update(dt, g) {
    const inp = g.input;
    const hvx = (inp.x - this.last.x) / dt, hvy = (inp.y - this.last.y) / dt;
    if (!this.held && inp.down) {
      this.held = this.crates.find((c) => Math.abs(inp.x - c.x) < 12 && Math.abs(inp.y - c.y) < 12) || null;
    }
    if (this.held && !inp.down) { // released: inherits the hand's velocity
      this.held.vx = g.clamp(hvx, -500, 500); this.held.vy = g.clamp(hvy, -500, 500); this.held = null;
    }
    for (const c of this.crates) {
      if (c === this.held) { c.x = inp.x; c.y = Math.min(inp.y, 216); c.vx = c.vy = 0; continue; }
      c.vy += 400 * dt; c.x += c.vx * dt; c.y += c.vy * dt;
      if (c.x < 6 || c.x > g.W - 6) { c.vx = -0.5 * c.vx; c.x = g.clamp(c.x, 6, g.W - 6); }
      const inBin = c.x > this.bin.x && c.x < this.bin.x + this.bin.w && c.y > this.bin.y;
      if (inBin) { c.gone = true; g.state.score += 1; continue; }
      if (c.y >= 216) {
        if (c.vy > 330) { c.gone = true; g.loseLife(); continue; } // impact too hard: it breaks
        c.y = 216; c.vy = 0; c.vx *= 0.6;
      }
    }
    this.crates = this.crates.filter((c) => !c.gone);
    this.refill(g);
    this.last = { x: inp.x, y: inp.y };
  },
  render(ctx, g) {
    g.rect(0, 222, g.W, 18, "#5a4a3a");
    g.rect(this.bin.x, this.bin.y, this.bin.w, 42, "#2f6f4f");
    for (const c of this.crates) g.rect(c.x - 6, c.y - 6, 12, 12, c === this.held ? "#f2e94e" : "#c97b2a");
    g.circle(g.input.x, g.input.y, 2, "#ffffff");
  },
});
