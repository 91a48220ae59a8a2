// Hopper: gravity and jumping. Run over gaps and boxes on a scrolling ground.
IPR.run({
  init(g) {
    this.p = { x: 60, y: 180, vy: 0, w: 12, h: 16 };
    this.scroll = 0; this.speed = 90; this.groundY = 196;
    this.segs = [[-100, 300]]; this.boxes = [];
    this.extend(g);
  },
  extend(g) { // ground segments and boxes ahead of the screen
    let end = this.segs[this.segs.length - 1][1];
    while (end < this.scroll + g.W + 200) {
      const gap = g.rand(28, 56), len = g.rand(90, 220), start = end + gap;
      this.segs.push([start, start + len]);
      if (g.random() < 0.6) this.boxes.push({ x: start + g.rand(30, len - 20), w: 12, h: g.rand(10, 22) });
      end = start + len;
    }
  },
  onGround(wx) { return this.segs.some(([a, b]) => wx + 10 > a && wx + 2 < b); },
  update(dt, g) {
    const p = this.p, inp = g.input;
    this.scroll += this.speed * dt;
    g.state.score = Math.floor(this.scroll / 10);
    if (inp.keys.has("ArrowRight")) p.x = Math.min(p.x + 60 * dt, 200);
    if (inp.keys.has("ArrowLeft")) p.x = Math.max(p.x - 60 * dt, 20);
    const wx = this.scroll + p.x;
    const standing = p.y + p.h >= this.groundY && p.vy >= 0 && this.onGround(wx);
    if (standing) { p.y = this.groundY - p.h; p.vy = 0; if (inp.keys.has(" ")) p.vy = -330; }
    else p.vy += 900 * dt; // gravity
    p.y += p.vy * dt;
    for (const b of this.boxes) {
      const bx = b.x - this.scroll;
      if (!b.hit && p.x + p.w > bx && p.x < bx + b.w && p.y + p.h > this.groundY - b.h) {
        b.hit = true; g.loseLife();
      }
    }
    if (p.y > g.H) { // fell into a gap: respawn on fresh ground
      g.loseLife();
      this.segs.push([this.scroll + p.x - 20, this.scroll + p.x + 120]);
      this.segs.sort((a, b) => a[0] - b[0]);
      p.y = this.groundY - p.h; p.vy = 0;
    }
    this.segs = this.segs.filter(([, b]) => b > this.scroll - 50);
    this.boxes = this.boxes.filter((b) => b.x > this.scroll - 50);
    this.extend(g);
  },
  render(ctx, g) {
    for (const [a, b] of this.segs) g.rect(a - this.scroll, this.groundY, b - a, g.H - this.groundY, "#3a7d44");
    for (const b of this.boxes) g.rect(b.x - this.scroll, this.groundY - b.h, b.w, b.h, b.hit ? "#555" : "#c97b2a");
    g.rect(this.p.x, this.p.y, this.p.w, this.p.h, "#f2e94e");
  },
});
