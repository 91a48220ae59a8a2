// Bumper: momentum and elastic collisions on a round arena with friction. Ram the red pucks out of
// the arena; leaving it yourself costs a life.
IPR.run({
  init(g) { this.me = { x: 160, y: 130, vx: 0, vy: 0, m: 2, r: 10 }; this.foes = []; this.spawn(g); },
  arena: { x: 160, y: 130, r: 100 },
  spawn(g) {
    while (this.foes.length < 3) {
      const a = g.rand(0, 2 * Math.PI);
      this.foes.push({ x: 160 + Math.cos(a) * 60, y: 130 + Math.sin(a) * 60, vx: 0, vy: 0, m: 1, r: 8 });
    }
  },
  update(dt, g) {
    const k = g.input.keys, me = this.me, A = this.arena;
    const F = 420 * dt;
    if (k.has("ArrowLeft")) me.vx -= F; if (k.has("ArrowRight")) me.vx += F;
    if (k.has("ArrowUp")) me.vy -= F; if (k.has("ArrowDown")) me.vy += F;
    for (const f of this.foes) { // foes push toward the player
      const dx = me.x - f.x, dy = me.y - f.y, d = Math.hypot(dx, dy) || 1;
      f.vx += (dx / d) * 120 * dt; f.vy += (dy / d) * 120 * dt;
    }
    const all = [me, ...this.foes];
    for (const b of all) { b.vx *= Math.pow(0.3, dt); b.vy *= Math.pow(0.3, dt); b.x += b.vx * dt; b.y += b.vy * dt; }
    for (let i = 0; i < all.length; i++) for (let j = i + 1; j < all.length; j++) {
      const a = all[i], b = all[j], dx = b.x - a.x, dy = b.y - a.y, d = Math.hypot(dx, dy);
      if (d > 0 && d < a.r + b.r) { // 1-D elastic collision along the normal, conserving momentum
        const nx = dx / d, ny = dy / d, rel = (a.vx - b.vx) * nx + (a.vy - b.vy) * ny;
        if (rel > 0) {
          const jimp = (2 * rel) / (1 / a.m + 1 / b.m);
          a.vx -= (jimp / a.m) * nx; a.vy -= (jimp / a.m) * ny; b.vx += (jimp / b.m) * nx; b.vy += (jimp / b.m) * ny;
        }
        const push = (a.r + b.r - d) / 2; a.x -= nx * push; a.y -= ny * push; b.x += nx * push; b.y += ny * push;
      }
    }
    const out = (b) => Math.hypot(b.x - A.x, b.y - A.y) > A.r;
    const before = this.foes.length;
    this.foes = this.foes.filter((f) => !out(f));
    g.state.score += before - this.foes.length;
    if (out(me)) { g.loseLife(); Object.assign(me, { x: 160, y: 130, vx: 0, vy: 0 }); }
    this.spawn(g);
  },
  render(ctx, g) {
    g.circle(this.arena.x, this.arena.y, this.arena.r, "#3a3a5a");
    for (const f of this.foes) g.circle(f.x, f.y, f.r, "#d04a4a");
    g.circle(this.me.x, this.me.y, this.me.r, "#4ec0f2");
  },
});
