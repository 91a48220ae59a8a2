// Dodge: gravity and bouncing. Rocks fall, accelerate and bounce once; move (with momentum) to
// dodge them. Score grows with the time survived.
IPR.run({
  init(g) { this.p = { x: 160, vx: 0 }; this.rocks = []; this.t = 0; this.spawnIn = 0.5; },
  update(dt, g) {
    const p = this.p, k = g.input.keys;
    this.t += dt; g.state.score = Math.floor(this.t * 10);
    if (k.has("ArrowLeft")) p.vx -= 700 * dt;
    if (k.has("ArrowRight")) p.vx += 700 * dt;
    p.vx *= Math.pow(0.02, dt); // ground friction
    p.x += p.vx * dt;
    if (p.x < 8 || p.x > g.W - 8) { p.vx = 0; p.x = g.clamp(p.x, 8, g.W - 8); }
    this.spawnIn -= dt;
    if (this.spawnIn <= 0) {
      this.rocks.push({ x: g.rand(10, 310), y: -10, vx: g.rand(-30, 30), vy: g.rand(0, 40), r: g.rand(5, 10), bounced: false });
      this.spawnIn = Math.max(0.25, 0.9 - this.t / 120);
    }
    for (const r of this.rocks) {
      r.vy += 400 * dt; r.x += r.vx * dt; r.y += r.vy * dt;
      if (r.y > 224 - r.r && !r.bounced) { r.y = 224 - r.r; r.vy = -0.55 * r.vy; r.bounced = true; } // restitution
      if (!r.hit && Math.abs(r.x - p.x) < r.r + 7 && r.y > 208 - r.r && r.y < 226) { r.hit = true; g.loseLife(); }
    }
    this.rocks = this.rocks.filter((r) => r.y < g.H + 20 && !r.hit);
  },
  render(ctx, g) {
    g.rect(0, 224, g.W, 16, "#5a4a3a");
    for (const r of this.rocks) g.circle(r.x, r.y, r.r, "#a0a0a0");
    g.rect(this.p.x - 7, 210, 14, 14, "#4ec0f2");
  },
});
