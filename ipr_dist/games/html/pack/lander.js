// Lander: gravity against thrust. Land on the pad slowly and upright enough; fuel is limited.
IPR.run({
  init(g) { this.level = 0; this.reset(g); },
  reset(g) {
    this.l = { x: g.rand(40, 280), y: 30, vx: g.rand(-20, 20), vy: 0, fuel: 100 };
    this.pad = { x: g.rand(20, 250), w: 50 - Math.min(this.level * 4, 24) };
  },
  update(dt, g) {
    const l = this.l, k = g.input.keys;
    l.vy += 60 * dt; // lunar gravity
    if (l.fuel > 0) {
      if (k.has("ArrowUp")) { l.vy -= 130 * dt; l.fuel -= 20 * dt; }
      if (k.has("ArrowLeft")) { l.vx -= 50 * dt; l.fuel -= 8 * dt; }
      if (k.has("ArrowRight")) { l.vx += 50 * dt; l.fuel -= 8 * dt; }
    }
    l.x += l.vx * dt; l.y += l.vy * dt;
    if (l.x < 0 || l.x > g.W) { g.loseLife(); this.reset(g); return; }
    if (l.y >= 222) {
      const onPad = l.x > this.pad.x && l.x < this.pad.x + this.pad.w;
      if (onPad && l.vy < 45 && Math.abs(l.vx) < 30) {
        g.state.score += 100 + Math.floor(Math.max(l.fuel, 0)); this.level += 1;
      } else g.loseLife();
      this.reset(g);
    }
  },
  render(ctx, g) {
    g.rect(0, 230, g.W, 10, "#777777");
    g.rect(this.pad.x, 228, this.pad.w, 4, "#40c040");
    const l = this.l;
    g.rect(l.x - 5, l.y - 8, 10, 8, "#dddddd");
    if (g.input.keys.has("ArrowUp") && l.fuel > 0) g.rect(l.x - 2, l.y, 4, 5, "#ff8030");
    g.rect(4, 16, Math.max(l.fuel, 0) * 0.6, 3, "#f2e94e");
  },
});
