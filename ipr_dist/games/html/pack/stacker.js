// Stacker: gravity and support. A block slides back and forth; press Space to drop it. The part
// that overhangs the block below has no support and falls away; no overlap at all costs a life.
IPR.run({
  init(g) {
    this.stack = [{ x: 110, w: 100, y: 224 }]; this.falling = []; this.speed = 70;
    this.next(g);
  },
  next(g) {
    const top = this.stack[this.stack.length - 1];
    this.cur = { x: g.random() < 0.5 ? 0 : g.W - top.w, w: top.w, y: 40, dir: 1, vy: 0, dropping: false };
    this.cur.dir = this.cur.x === 0 ? 1 : -1;
  },
  update(dt, g) {
    const c = this.cur, top = this.stack[this.stack.length - 1];
    for (const f of this.falling) { f.vy += 500 * dt; f.y += f.vy * dt; }
    this.falling = this.falling.filter((f) => f.y < g.H);
    if (!c.dropping) {
      c.x += c.dir * this.speed * dt;
      if (c.x < 0 || c.x + c.w > g.W) { c.dir = -c.dir; c.x = g.clamp(c.x, 0, g.W - c.w); }
      if (g.input.pressed.has(" ")) c.dropping = true;
      return;
    }
    c.vy += 500 * dt; c.y += c.vy * dt; // free fall
    const land = top.y - 10;
    if (c.y >= land) {
      const left = Math.max(c.x, top.x), right = Math.min(c.x + c.w, top.x + top.w);
      if (right - left <= 0) { this.falling.push({ ...c }); g.loseLife(); this.next(g); return; }
      if (c.x < left) this.falling.push({ x: c.x, w: left - c.x, y: land, vy: c.vy });
      if (c.x + c.w > right) this.falling.push({ x: right, w: c.x + c.w - right, y: land, vy: c.vy });
      this.stack.push({ x: left, w: right - left, y: land });
      g.state.score += 1; this.speed = Math.min(this.speed + 6, 200);
      if (this.stack.length > 12) { // scroll the tower down
        this.stack = this.stack.slice(-6); const dy = 224 - this.stack[0].y;
        for (const s of this.stack) s.y += dy;
      }
      this.next(g);
    }
  },
  render(ctx, g) {
    for (const s of this.stack) g.rect(s.x, s.y, s.w, 10, "#4a90d0");
    for (const f of this.falling) g.rect(f.x, f.y, f.w, 10, "#7a7a7a");
    g.rect(this.cur.x, this.cur.y, this.cur.w, 10, "#f2e94e");
  },
});
