// The virtual clock of a game page. Installed before the game's own scripts, by the HTML environment
// (an init script of its browser context) and by `ipr record`'s page (a script put at the top of the
// game's HTML), so a person and the fleet play a game under the same time: Date, performance.now(),
// setTimeout / setInterval, requestAnimationFrame and requestIdleCallback move only when runFor(ms)
// moves them.
//
// Rules (what a browser does at a steady 62.5 frames per virtual second):
//   - time starts at 0 (performance.now()) and at `originMs` (Date.now()) when install() is called;
//   - a timer is due at now + delay; a zero-delay timer set while a timer runs is due 1 ms later, so a
//     callback that re-arms itself with delay 0 cannot keep runFor from returning;
//   - animation-frame callbacks run at the next multiple of FRAME_MS, each with that time;
//   - due timers run in order of due time, then of creation; the page's own tasks (promises, message
//     events) get a turn after each one;
//   - an exception in a callback does not stop the others; runFor throws the first one when done (the
//     environment turns it into a GameError naming the game).
(() => {
  "use strict";
  if (window.__iprClock) return;
  const FRAME_MS = 16;
  const RealDate = Date;
  const channel = new MessageChannel();
  const waiting = [];
  channel.port1.onmessage = () => waiting.shift()();
  const nextTask = () => new Promise((resolve) => { waiting.push(resolve); channel.port2.postMessage(0); });

  const clock = {
    originMs: 0,
    now: 0,
    timers: new Map(),
    nextId: 1,
    inCallback: false,

    add(kind, func, delay, args) {
      delay = Number(delay) || 0;
      if (!Number.isFinite(delay) || delay < 0 || delay > 2 ** 31 - 1) delay = 0;
      if (kind === "frame") delay = FRAME_MS - (this.now % FRAME_MS);
      if (kind === "interval") delay = Math.max(1, delay);
      const id = this.nextId++;
      this.timers.set(id, { id, kind, func, args, delay, due: this.now + (delay || (this.inCallback ? 1 : 0)) });
      return id;
    },
    clear(id) {
      this.timers.delete(Number(id));
    },
    first(until) {
      let best = null;
      for (const t of this.timers.values()) {
        if (t.due <= until && (!best || t.due < best.due || (t.due === best.due && t.id < best.id))) best = t;
      }
      return best;
    },
    async runFor(ms) {
      const until = this.now + ms;
      let firstError = null;
      for (let t = this.first(until); t; t = this.first(until)) {
        this.now = t.due;
        if (t.kind === "interval") t.due += t.delay;
        else this.timers.delete(t.id);
        const args = t.kind === "frame" ? [this.now]
          : t.kind === "idle" ? [{ didTimeout: false, timeRemaining: () => 0 }] : t.args;
        this.inCallback = true;
        try {
          if (typeof t.func === "function") t.func.apply(window, args);
          else (0, eval)(String(t.func));
        } catch (e) {
          firstError = firstError || e;
        } finally {
          this.inCallback = false;
        }
        await nextTask();
      }
      this.now = until;
      if (firstError) throw firstError;
    },
  };

  function install(originMs) {
    clock.originMs = originMs;
    const nowMs = () => clock.originMs + clock.now;
    window.Date = new Proxy(RealDate, {
      construct: (target, args, newTarget) => Reflect.construct(target, args.length ? args : [nowMs()], newTarget),
      apply: () => new RealDate(nowMs()).toString(),
      get: (target, prop, receiver) => (prop === "now" ? nowMs : Reflect.get(target, prop, receiver)),
    });
    Object.defineProperty(performance, "now", { value: () => clock.now, configurable: true, writable: true });
    window.setTimeout = (func, delay, ...args) => clock.add("timeout", func, delay, args);
    window.setInterval = (func, delay, ...args) => clock.add("interval", func, delay, args);
    window.requestAnimationFrame = (func) => clock.add("frame", func, 0, []);
    window.requestIdleCallback = (func) => clock.add("idle", func, 1, []);
    for (const name of ["clearTimeout", "clearInterval", "cancelAnimationFrame", "cancelIdleCallback"]) {
      window[name] = (id) => clock.clear(id);
    }
  }

  Object.defineProperty(window, "__iprClock", {
    value: { install, runFor: (ms) => clock.runFor(ms), now: () => clock.now },
  });
})();
