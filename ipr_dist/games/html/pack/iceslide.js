// Ice Slide: friction and sliding. Push with the arrow keys; on ice you glide far, on sand you stop
// quickly. Collect coins and do not slide into a hole.
IPR.run({
  init(g) {
    this.p = { x: 160, y: 130, vx: 0, vy: 0 };
    this.tiles = []; // 10 x 7 grid of 32 px tiles: 0 ice, 1 sand, 2 hole
    for (let r = 0; r < 7; r++) for (let c = 0; c < 10; c++) {
      const u = g.random();
      this.tiles.push(r === 3 && c === 5 ? 0 : u < 0.12 ? 2 : u < 0.45 ? 1 : 0);
    }
    this.coin(g);
  },
  tile(x, y) {
    const c = Math.floor(x / 32), r = Math.floor((y - 16) / 32);
    return c < 0 || c > 9 || r < 0 || r > 6 ? 1 : this.tiles[r * 10 + c];
  },
  coin(g) {
    do { this.c = { x: g.randint(0, 9) * 32 + 16, y: g.randint(0, 6) * 32 + 32 }; } while (this.tile(this.c.x, this.c.y) === 2);
  },
  update(dt, g) {
    const p = this.p, k = g.input.keys;
    const push = 180 * dt;
    if (k.has("ArrowLeft")) p.vx -= push; if (k.has("ArrowRight")) p.vx += push;
    if (k.has("ArrowUp")) p.vy -= push; if (k.has("ArrowDown")) p.vy += push;
    const t = this.tile(p.x, p.y), mu = t === 1 ? 4.0 : 0.25; // kinetic friction per surface
    const v = Math.hypot(p.vx, p.vy), f = mu * 60 * dt;
    if (v <= f) p.vx = p.vy = 0; else { p.vx -= (p.vx / v) * f; p.vy -= (p.vy / v) * f; }
    p.x += p.vx * dt; p.y += p.vy * dt;
    if (p.x < 5 || p.x > g.W - 5) { p.vx = -0.4 * p.vx; p.x = g.clamp(p.x, 5, g.W - 5); }
    if (p.y < 21 || p.y > g.H - 5) { p.vy = -0.4 * p.vy; p.y = g.clamp(p.y, 21, g.H - 5); }
    if (t === 2) { g.loseLife(); Object.assign(p, { x: 176, y: 128, vx: 0, vy: 0 }); }
    if (Math.hypot(p.x - this.c.x, p.y - this.c.y) < 10) { g.state.score += 1; this.coin(g); }
  },
  render(ctx, g) {
    for (let r = 0; r < 7; r++) for (let c = 0; c < 10; c++) {
      const t = this.tiles[r * 10 + c];
      g.rect(c * 32, 16 + r * 32, 32, 32, ["#bfe6ff", "#d9c08c", "#111111"][t]);
    }
    g.circle(this.c.x, this.c.y, 5, "#f2c12e");
    g.rect(this.p.x - 5, this.p.y - 5, 10, 10, "#d04a4a");
  },
});
