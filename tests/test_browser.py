"""The Chromium HTML games run in: found from the configuration, PATH and Playwright's own install,
each candidate in turn; with none, `ipr collect` of an HTML game stops before anything starts with
one sentence naming every path tried and how to install one."""

import os
import stat

import pytest

from ipr_dist.errors import GameError
from ipr_dist.games import browser

from .conftest import assert_one_line_error, run_ipr


def fake_executable(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """No browser on PATH, Playwright's browser directory empty."""
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("PLAYWRIGHT_BROWSERS_PATH", str(tmp_path / "ms-playwright"))
    browser.find_browser.cache_clear()
    yield tmp_path
    browser.find_browser.cache_clear()


@pytest.mark.parametrize("name", browser.ON_PATH)
def test_each_name_on_path_is_found(bare, name):
    path = fake_executable(bare / "bin" / name)
    assert browser.find_browser() == path


def test_debian_chromium_comes_before_ubuntu_chromium_browser(bare):
    debian = fake_executable(bare / "bin" / "chromium")
    fake_executable(bare / "bin" / "chromium-browser")
    assert browser.find_browser() == debian


def test_playwrights_own_chromium_is_found_where_playwright_installs_it(bare):
    expected = browser.playwright_browser()  # Playwright's own path under PLAYWRIGHT_BROWSERS_PATH
    assert expected.startswith(str(bare / "ms-playwright"))
    fake_executable(__import__("pathlib").Path(expected))
    assert browser.find_browser() == expected


def test_the_configured_path_wins_and_a_wrong_one_is_named(bare):
    fake_executable(bare / "bin" / "chromium")
    mine = fake_executable(bare / "opt" / "my-chrome")
    assert browser.find_browser(mine) == mine
    with pytest.raises(GameError, match="env.browser: /nowhere/chrome is not an executable"):
        browser.find_browser("/nowhere/chrome")


def test_none_found_names_every_path_tried(bare):
    with pytest.raises(GameError) as err:
        browser.find_browser()
    msg = str(err.value)
    for name in browser.ON_PATH:
        assert f"{name} on PATH" in msg
    assert "Playwright's Chromium" in msg and "playwright install" in msg and "apt-get install chromium" in msg


def test_collect_of_an_html_game_without_a_browser_fails_at_fleet_start(tmp_path):
    env_path = f"{tmp_path / 'bin'}"
    os.makedirs(env_path)
    proc = run_ipr("collect", "configs/smoke.yaml", "--set", f"run.root={tmp_path / 'runs'}",
                   "--set", "fleet.games=[Airstriker-Genesis, Bounce-Html]",
                   env={"PATH": env_path, "PLAYWRIGHT_BROWSERS_PATH": str(tmp_path / "ms-playwright")})
    assert_one_line_error(proc, "HTML games need Chromium", "chromium on PATH", "playwright install")
    assert not (tmp_path / "runs" / "smoke" / "data").exists()  # stopped before anything was written
