// Installed after clock.js, before the game's own scripts: by the HTML environment into every page it
// opens, and by `ipr record` into the game a person plays in their own page. One call per step: apply
// the action as DOM input events, advance the page's virtual clock by one frame, read the game
// variables and the canvas (scaled to the observation size).
(() => {
  "use strict";
  const bridge = {
    setup(cfg) {
      const c = document.querySelector(cfg.canvas);
      if (!c) return { error: `canvas selector '${cfg.canvas}' matches no element` };
      if (!(c instanceof HTMLCanvasElement)) {
        return { error: `canvas selector '${cfg.canvas}' matches a <${c.tagName.toLowerCase()}>, not a <canvas>` };
      }
      this.cfg = cfg;
      this.canvas = c;
      this.out = document.createElement("canvas");
      this.out.width = cfg.width;
      this.out.height = cfg.height;
      this.octx = this.out.getContext("2d", { willReadFrequently: true });
      this.exprs = {};
      for (const [name, src] of Object.entries(cfg.exprs)) {
        try { this.exprs[name] = new Function(`return (${src});`); }
        catch (e) { return { error: `${name} expression \`${src}\` is not valid JavaScript (${e.message})` }; }
      }
      this.held = cfg.keys.map(() => 0);
      this.hold = 0;
      this.pointer = null;
      c.tabIndex = c.tabIndex >= 0 ? c.tabIndex : 0;
      c.focus();
      const r = c.getBoundingClientRect();
      return { ok: true, size: [c.width, c.height], rect: [r.left, r.top, r.width, r.height] };
    },
    _key(type, i) {
      // Older canvas games read the legacy keyCode / which / charCode, which a synthetic KeyboardEvent
      // leaves at 0, so they are set here as a real keyboard's events carry them; a printable key's
      // keydown is followed by a keypress carrying its character code.
      const [key, code, keyCode, charCode] = this.cfg.keys[i];
      // The focused element (the canvas, focused by setup); in a recording page, where the person's
      // own page keeps the focus, the canvas itself: the same target either way.
      const active = document.activeElement;
      const target = active && active !== document.body ? active : this.canvas;
      const send = (t, kc, cc) => {
        const e = new KeyboardEvent(t, { key, code, bubbles: true, cancelable: true });
        for (const [name, v] of [["keyCode", kc], ["which", kc || cc], ["charCode", cc]]) {
          Object.defineProperty(e, name, { get: () => v });
        }
        target.dispatchEvent(e);
      };
      send(type, keyCode, 0);
      if (type === "keydown" && charCode) send("keypress", charCode, charCode);
    },
    _mouse(type, button, buttons) {
      const [cx, cy] = this.pointer;
      const init = { clientX: cx, clientY: cy, button, buttons, bubbles: true, cancelable: true, view: window };
      const ptr = { pointerdown: "pointerdown", mousedown: "pointerdown", mouseup: "pointerup", mousemove: "pointermove" }[type];
      if (ptr) this.canvas.dispatchEvent(new PointerEvent(ptr, { ...init, pointerId: 1, pointerType: "mouse", isPrimary: true }));
      const cls = type === "wheel" ? WheelEvent : MouseEvent;
      this.canvas.dispatchEvent(new cls(type, type === "wheel" ? { ...init, deltaY: this._scroll * 100 } : init));
    },
    apply(a) {
      a.keys.forEach((on, i) => {
        if (on && !this.held[i]) this._key("keydown", i);
        if (!on && this.held[i]) this._key("keyup", i);
        this.held[i] = on;
      });
      if (!this.cfg.mouse) return;
      const r = this.canvas.getBoundingClientRect();
      const p = [r.left + a.mouse[0] * r.width, r.top + a.mouse[1] * r.height];
      const moved = !this.pointer || p[0] !== this.pointer[0] || p[1] !== this.pointer[1];
      this.pointer = p;
      const [click, right, hold] = a.mouse_buttons;
      if (moved) this._mouse("mousemove", 0, this.hold ? 1 : 0);
      if (hold && !this.hold) this._mouse("mousedown", 0, 1);
      if (!hold && this.hold) { this._mouse("mouseup", 0, 0); this._mouse("click", 0, 0); }
      this.hold = hold;
      if (click && !hold) { this._mouse("mousedown", 0, 1); this._mouse("mouseup", 0, 0); this._mouse("click", 0, 0); }
      if (right) { this._mouse("mousedown", 2, 2); this._mouse("mouseup", 2, 0); this._mouse("contextmenu", 2, 0); }
      if (a.scroll) { this._scroll = a.scroll; this._mouse("wheel", 0, this.hold ? 1 : 0); }
    },
    read() {
      const vars = {};
      for (const [name, f] of Object.entries(this.exprs)) {
        try { const v = f(); vars[name] = v === undefined ? null : v; }
        catch (e) { vars[name] = { error: String((e && e.message) || e) }; }
      }
      const regions = (this.cfg.regions || []).map(([x0, y0, x1, y1]) => {
        // Pixel readers see the canvas at its own resolution, one region at a time.
        const c = this.canvas, sx = Math.floor(x0 * c.width), sy = Math.floor(y0 * c.height);
        const sw = Math.max(1, Math.round(x1 * c.width) - sx), sh = Math.max(1, Math.round(y1 * c.height) - sy);
        if (!this.rcanvas) this.rcanvas = document.createElement("canvas");
        this.rcanvas.width = sw; this.rcanvas.height = sh;
        const rctx = this.rcanvas.getContext("2d", { willReadFrequently: true });
        rctx.drawImage(c, sx, sy, sw, sh, 0, 0, sw, sh);
        const px = rctx.getImageData(0, 0, sw, sh).data;
        let rs = "";
        for (let i = 0; i < px.length; i += 0x8000) rs += String.fromCharCode.apply(null, px.subarray(i, i + 0x8000));
        return { w: sw, h: sh, data: btoa(rs) };
      });
      this.octx.drawImage(this.canvas, 0, 0, this.out.width, this.out.height);
      const d = this.octx.getImageData(0, 0, this.out.width, this.out.height).data;
      let s = "";
      for (let i = 0; i < d.length; i += 0x8000) s += String.fromCharCode.apply(null, d.subarray(i, i + 0x8000));
      return { frame: btoa(s), vars, regions };
    },
    async advance(ms) {
      await window.__iprClock.runFor(ms);
    },
    async step(a) {
      this.apply(a);
      await this.advance(this.cfg.frame_ms);
      return this.read();
    },
  };
  Object.defineProperty(window, "__iprBridge", { value: bridge });
})();
