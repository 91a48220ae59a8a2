"""The Chromium that HTML games run in: the configured executable (`env.browser`), else the first
usable one of Debian's `chromium`, Ubuntu's `chromium-browser`, Google Chrome, and the Chromium
Playwright installed itself (`python -m playwright install chromium`, under PLAYWRIGHT_BROWSERS_PATH
or ~/.cache/ms-playwright). Found on the node that plays the game; a game with none fails in one
sentence naming every path tried and the commands that install one."""

from __future__ import annotations

import os
import shutil
from functools import lru_cache

from ipr_dist.errors import GameError

ON_PATH = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = ("`apt-get install chromium` (Debian; scripts/setup.sh does it) or "
           "`python -m playwright install --with-deps chromium` (any Linux, Ubuntu included)")


def _usable(path: str | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def playwright_browser() -> str | None:
    """Where Playwright's own Chromium is (or would be) installed; None when Playwright is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    with sync_playwright() as pw:
        return pw.chromium.executable_path


def require_browser(games: list[str], html_specs: tuple[str, ...], configured: str | None) -> str | None:
    """At fleet start: when any of `games` is an HTML game, the browser it will use (GameError when none)."""
    from ipr_dist.games.html_spec import HtmlGameSpec
    from ipr_dist.games.specs import find_game_spec

    if not any(isinstance(find_game_spec(g, tuple(html_specs)), HtmlGameSpec) for g in games):
        return None
    return find_browser(configured)


@lru_cache(maxsize=8)
def find_browser(configured: str | None = None) -> str:
    """The Chromium executable to launch; GameError naming every path tried when there is none."""
    if configured:
        if _usable(configured):
            return configured
        raise GameError(f"env.browser: {configured} is not an executable file; set env.browser to a Chromium "
                        f"executable, or leave it unset to search for one; install one with {INSTALL}")
    tried = []
    for name in ON_PATH:
        path = shutil.which(name)
        if _usable(path):
            return path
        tried.append(f"{name} on PATH")
    path = playwright_browser()
    if _usable(path):
        return path
    tried.append(f"Playwright's Chromium ({path})" if path else "Playwright's Chromium (playwright not installed)")
    raise GameError(f"HTML games need Chromium and none was found (tried {', '.join(tried)}); install one with "
                    f"{INSTALL}, or set env.browser to its path")
