// Juggle: gravity and impulses. Click a ball to knock it upward (off-centre clicks push it
// sideways); a ball that hits the floor costs a life.
IPR.run({
  init(g) { this.balls = [this.ball(g)]; this.t = 0; },
  ball(g) { return { x: g.rand(60, 260), y: 40, vx: g.rand(-30, 30), vy: 0, r: 12 }; },
  update(dt, g) {
    const inp = g.input;
    this.t += dt;
    if (this.balls.length < 1 + Math.floor(this.t / 20) && this.balls.length < 4) this.balls.push(this.ball(g));
    for (const b of this.balls) {
      if (inp.clicked && Math.hypot(inp.x - b.x, inp.y - b.y) < b.r + 6) {
        b.vy = -260; b.vx += (b.x - inp.x) * 12; g.state.score += 1; // impulse
      }
      b.vy += 320 * dt; b.x += b.vx * dt; b.y += b.vy * dt;
      if (b.x < b.r || b.x > g.W - b.r) { b.vx = -0.8 * b.vx; b.x = g.clamp(b.x, b.r, g.W - b.r); }
      if (b.y < b.r) { b.vy = Math.abs(b.vy) * 0.5; }
      if (b.y > g.H - b.r) { g.loseLife(); Object.assign(b, this.ball(g)); }
    }
  },
  render(ctx, g) {
    g.rect(0, g.H - 2, g.W, 2, "#e04040");
    for (const b of this.balls) g.circle(b.x, b.y, b.r, "#f29e4e");
    g.circle(g.input.x, g.input.y, 2, "#ffffff");
  },
});
