"""The game catalog over stable-retro's integrations, annotations, and importing ROMs."""

import json
import shutil
import zipfile

import pytest

from ipr_dist.errors import ConfigError
from ipr_dist.games import game_info
from ipr_dist.games.catalog import describe_keys, import_roms, load_annotations, retro_game_info

from .conftest import assert_one_line_error, run_ipr


def test_games_list_shows_over_1000_games_with_airstriker_installed():
    proc = run_ipr("games", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    games = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(games) >= 1000
    air = next(g for g in games if g["id"] == "Airstriker-Genesis-v0")
    assert air["installed"] and air["platform"] == "Genesis" and air["annotated"]
    assert {"lives", "score"} <= set(air["variables"])
    assert "RIGHT" in air["keys"] and None not in air["keys"]
    nes = next(g for g in games if g["id"] == "SuperMarioBros-Nes-v0")
    assert not nes["installed"] and nes["keys"] == ["B", "SELECT", "START", "UP", "DOWN", "LEFT", "RIGHT", "A"]
    table = run_ipr("games", "list", "--installed", "--kind", "retro")
    assert "Airstriker-Genesis-v0" in table.stdout and "1 game(s)" in table.stdout


def test_annotations_are_loaded_and_user_files_extend_them(tmp_path):
    air = game_info("Airstriker-Genesis")
    assert "projectile motion" in air.annotation.physics
    assert describe_keys(air, ["RIGHT", "B"]) == "move right and fire"
    assert describe_keys(air, ["Z"]) == "press Z"  # unannotated control still has a text
    extra = tmp_path / "mine.yaml"
    extra.write_text("Airstriker-Genesis:\n  goal: my goal\n  controls: {B: shoot}\nPong-Atari2600-v0:\n  goal: win\n")
    ann = load_annotations([extra])
    assert ann["Airstriker-Genesis"].goal == "my goal"
    assert retro_game_info("Pong-Atari2600-v0", ann).annotation.goal == "win"
    assert retro_game_info("1942-Nes-v0", ann).annotation is None  # unannotated games still work


def test_bad_annotation_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("Airstriker-Genesis:\n  physic: [gravity]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: Airstriker-Genesis.physic"):
        load_annotations([bad])


def test_keys_and_press_keys_must_be_the_games_own_and_are_for_retro_games(tmp_path):
    """`keys` (the buttons a retro game is played with) and `press` (those it acts on when pressed) name the
    game's own controls, each once; an HTML game's keys come from its spec and reach it as key events."""
    assert game_info("Airstriker-Genesis").annotation.press == ["B"]
    bad = tmp_path / "press.yaml"
    bad.write_text("Airstriker-Genesis:\n  press: [B, SPACE]\nBounce-Html:\n  press: [ArrowLeft]\n")
    ann = load_annotations([bad])
    with pytest.raises(ConfigError, match=r"Airstriker-Genesis-v0: its annotation's `press` names \['SPACE'\]"):
        retro_game_info("Airstriker-Genesis-v0", ann)
    with pytest.raises(ConfigError, match=r"Bounce-Html: its annotation sets `press`, which only retro games"):
        game_info("Bounce-Html", ann)
    bad.write_text("Airstriker-Genesis:\n  keys: [B, FIRE]\nPong-Atari2600-v0:\n  keys: [UP, UP]\n")
    ann = load_annotations([bad])
    with pytest.raises(ConfigError, match=r"Airstriker-Genesis-v0: its annotation's `keys` names \['FIRE'\]"):
        retro_game_info("Airstriker-Genesis-v0", ann)
    with pytest.raises(ConfigError, match=r"Pong-Atari2600-v0: its annotation's `keys` repeats a button"):
        retro_game_info("Pong-Atari2600-v0", ann)


def _airstriker_rom():
    import stable_retro.data as d

    return d.get_romfile_path("Airstriker-Genesis-v0", d.Integrations.ALL)


def test_import_roms_matches_by_hash_and_reports_unmatched(tmp_path):
    roms = tmp_path / "roms"
    (roms / "sub").mkdir(parents=True)
    shutil.copy(_airstriker_rom(), roms / "sub" / "my airstriker.md")
    with zipfile.ZipFile(roms / "pack.zip", "w") as zf:
        zf.write(_airstriker_rom(), "inner.md")
    before = open(_airstriker_rom(), "rb").read()
    report = import_roms(roms)
    assert sorted(g for _, g in report.already) == ["Airstriker-Genesis-v0"] * 2
    assert report.unmatched == [] and report.imported == []
    assert open(_airstriker_rom(), "rb").read() == before
    proc = run_ipr("games", "import-roms", str(roms))
    assert proc.returncode == 0, proc.stderr
    assert "present   pack.zip:inner.md -> Airstriker-Genesis-v0" in proc.stdout


def test_import_roms_refuses_corrupt_roms_with_one_line_and_nonzero_exit(tmp_path):
    roms = tmp_path / "roms"
    roms.mkdir()
    data = bytearray(open(_airstriker_rom(), "rb").read())
    data[1000] ^= 0xFF  # one flipped byte: a corrupt dump
    (roms / "corrupt.md").write_bytes(bytes(data))
    (roms / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    shutil.copy(_airstriker_rom(), roms / "good.md")
    proc = run_ipr("games", "import-roms", str(roms))
    assert_one_line_error(proc, "2 file(s)", "matched no game")
    assert "no match  corrupt.md: no known game has this ROM's SHA-1" in proc.stdout
    assert "no match  broken.zip: corrupt zip archive" in proc.stdout
    assert "present   good.md -> Airstriker-Genesis-v0" in proc.stdout
    assert open(_airstriker_rom(), "rb").read() != bytes(data)  # the installed ROM was not touched
    assert_one_line_error(run_ipr("games", "import-roms", str(tmp_path / "missing")), "not a directory")
