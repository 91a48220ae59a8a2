// Put after clock.js and bridge.js into a game a person plays in `ipr record`'s page. The game is
// served from the other loopback name than the page (localhost vs 127.0.0.1), so it cannot read the
// page's token; the page calls the bridge through this relay with postMessage, and nothing else.
((parentOrigin) => {
  "use strict";
  const calls = { setup: (arg) => window.__iprBridge.setup(arg), step: (arg) => window.__iprBridge.step(arg) };
  const answer = (message) => window.parent.postMessage(message, parentOrigin);
  window.addEventListener("message", async (e) => {
    const m = e.data;
    if (e.source !== window.parent || e.origin !== parentOrigin || !m || !Object.hasOwn(calls, m.call)) return;
    try {
      answer({ id: m.id, result: await calls[m.call](m.arg) });
    } catch (err) {
      answer({ id: m.id, error: String((err && err.message) || err) });
    }
  });
  // An error the game throws outside a bridge call (at load, in an event handler) ends the session too,
  // as it fails an environment.
  window.addEventListener("error", (e) => answer({ id: null, error: String(e.message || e.error || "error") }));
})(__PARENT_ORIGIN__);
