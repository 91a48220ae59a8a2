// Bounce: rigid-body collision and bouncing. Keep the ball in play with the paddle, break bricks.
IPR.run({
  init(g) {
    this.pad = { x: 140, w: 44 }; this.serve(g); this.build();
  },
  serve(g) { this.b = { x: 160, y: 150, vx: g.rand(-90, 90), vy: -140 }; },
  build() {
    this.bricks = [];
    for (let r = 0; r < 4; r++) for (let c = 0; c < 10; c++) this.bricks.push({ x: 10 + c * 30, y: 30 + r * 12, alive: true });
  },
  update(dt, g) {
    const inp = g.input, b = this.b, p = this.pad;
    if (inp.keys.has("ArrowLeft")) p.x -= 200 * dt;
    if (inp.keys.has("ArrowRight")) p.x += 200 * dt;
    p.x = g.clamp(p.x, 0, g.W - p.w);
    b.x += b.vx * dt; b.y += b.vy * dt;
    if (b.x < 4 || b.x > g.W - 4) { b.vx = -b.vx; b.x = g.clamp(b.x, 4, g.W - 4); } // reflect off walls
    if (b.y < 18) { b.vy = Math.abs(b.vy); }
    if (b.vy > 0 && b.y > 218 && b.y < 226 && b.x > p.x - 3 && b.x < p.x + p.w + 3) {
      const off = (b.x - (p.x + p.w / 2)) / (p.w / 2); // where it hits sets the outgoing angle
      const speed = Math.min(Math.hypot(b.vx, b.vy) * 1.02, 260);
      b.vx = speed * Math.sin(off * 1.0); b.vy = -speed * Math.cos(off * 1.0);
    }
    for (const k of this.bricks) {
      if (k.alive && b.x > k.x && b.x < k.x + 28 && b.y > k.y && b.y < k.y + 10) {
        k.alive = false; b.vy = -b.vy; g.state.score += 1; break;
      }
    }
    if (this.bricks.every((k) => !k.alive)) this.build();
    if (b.y > g.H) { g.loseLife(); this.serve(g); }
  },
  render(ctx, g) {
    for (const k of this.bricks) if (k.alive) g.rect(k.x, k.y, 28, 10, ["#e04040", "#e0a040", "#40c040", "#4080e0"][(k.y - 30) / 12]);
    g.rect(this.pad.x, 222, this.pad.w, 6, "#dddddd");
    g.circle(this.b.x, this.b.y, 4, "#f2e94e");
  },
});
