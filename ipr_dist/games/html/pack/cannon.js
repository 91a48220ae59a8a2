// Cannon: projectile motion, aim-and-release with the mouse. Press near anywhere, drag to aim
// (direction and distance from the cannon set angle and power), release to fire.
IPR.run({
  init(g) {
    this.c = { x: 24, y: 214 }; this.ball = null; this.aim = null; this.wind = 0;
    this.newTarget(g);
  },
  newTarget(g) {
    this.t = { x: g.rand(150, 300), y: g.rand(60, 210), r: g.rand(8, 16) };
    this.wind = g.rand(-40, 40);
  },
  update(dt, g) {
    const inp = g.input;
    if (!this.ball) {
      if (inp.down) this.aim = { x: inp.x, y: inp.y };
      if (inp.released && this.aim) {
        const dx = this.aim.x - this.c.x, dy = this.aim.y - this.c.y, d = Math.hypot(dx, dy) || 1;
        const v = g.clamp(d * 1.6, 80, 420);
        this.ball = { x: this.c.x, y: this.c.y, vx: (v * dx) / d, vy: (v * dy) / d };
        this.aim = null;
      }
      return;
    }
    const b = this.ball;
    b.vy += 300 * dt; b.vx += this.wind * dt; // gravity and wind
    b.x += b.vx * dt; b.y += b.vy * dt;
    if (Math.hypot(b.x - this.t.x, b.y - this.t.y) < this.t.r + 4) {
      g.state.score += 1; this.ball = null; this.newTarget(g);
    } else if (b.y > g.H - 8 || b.x > g.W + 20 || b.x < -20) {
      this.ball = null; g.loseLife();
    }
  },
  render(ctx, g) {
    g.rect(0, g.H - 8, g.W, 8, "#4b3b2a");
    g.circle(this.t.x, this.t.y, this.t.r, "#e04040");
    g.circle(this.t.x, this.t.y, this.t.r / 2, "#ffffff");
    g.line(g.W / 2, 20, g.W / 2 + this.wind, 20, "#8fd3ff", 2);
    g.circle(this.c.x, this.c.y, 8, "#9aa0a6");
    if (this.aim) g.line(this.c.x, this.c.y, this.aim.x, this.aim.y, "#f2e94e", 1);
    if (this.ball) g.circle(this.ball.x, this.ball.y, 4, "#f2e94e");
  },
});
