"""Bad input never becomes a traceback: seeded fuzzing of the config loader and the HTML and desktop game-spec loaders
with hundreds of malformed, truncated and wrongly typed files. Each one either loads or is refused with
the project's one error type (ConfigError / GameError) and a message naming the file; nothing else is
raised. (The HTTP side is fuzzed in tests/test_policy_pipeline.py against a running `ipr serve` app.)"""

from pathlib import Path

import numpy as np
import pytest
import yaml

from ipr_dist.config import load_config
from ipr_dist.errors import ConfigError, GameError
from ipr_dist.games.html_spec import PACK_DIR, load_spec

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
ODD_VALUES = [None, "", "x" * 300, -1, 0, 10 ** 12, -0.5, 1e308, float("nan"), True, [], [1, "a"], {}, {"a": 1},
              "~", "[1, 2", "{a: }", "\x00", "🙂", "null", "1e999", [[[]]], "../../etc/passwd", "s3://"]


def leaves(tree, prefix=()):
    """Every (path, value) of a nested mapping, sections included."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield prefix + (k,), v
            yield from leaves(v, prefix + (k,))


def mutate(tree: dict, rng: np.random.Generator) -> object:
    """One random corruption: a value of another type, a deleted or unknown key, a section replaced by
    a scalar, the whole document replaced by a scalar or a list."""
    import copy

    doc = copy.deepcopy(tree)
    kind = rng.integers(0, 6)
    if kind == 5:
        return ODD_VALUES[rng.integers(len(ODD_VALUES))]
    paths = list(leaves(doc))
    path, _ = paths[rng.integers(len(paths))]
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if kind in (0, 1, 2):
        parent[path[-1]] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    elif kind == 3:
        del parent[path[-1]]
    else:
        parent[f"no_such_{rng.integers(100)}"] = 1
    return doc


def corrupt_text(text: str, rng: np.random.Generator) -> str:
    """Truncated, or with a run of random bytes spliced in, or with tabs for indentation."""
    cut = int(rng.integers(0, max(len(text), 1)))
    kind = rng.integers(0, 3)
    if kind == 0:
        return text[:cut]
    if kind == 1:
        noise = "".join(chr(int(c)) for c in rng.integers(1, 0x2FF, int(rng.integers(1, 20))))
        return text[:cut] + noise + text[cut:]
    return text.replace("  ", "\t", int(rng.integers(1, 5)))


def fuzz_files(tmp_path: Path, prefix: str, text: str, rng: np.random.Generator, load, error: type, n: int = 300,
               names_file: bool = False):
    """n corrupted copies of a YAML document (every third a corrupted text, the rest a mutated tree): each
    loads or raises `error` with a one-line message. Returns (tried, refused)."""
    tree = yaml.safe_load(text)
    refused = 0
    for i in range(n):
        path = tmp_path / f"{prefix}{i}.yaml"
        path.write_text(corrupt_text(text, rng) if i % 3 == 0 else yaml.safe_dump(mutate(tree, rng), allow_unicode=True))
        try:
            load(path)
        except error as exc:
            refused += 1
            message = str(exc)
            assert message and "\n" not in message.strip() and "Traceback" not in message, message
            assert not names_file or str(path) in message or path.name in message, message
    return n, refused


def test_config_loader_refuses_every_malformed_file_with_one_config_error(tmp_path):
    tried, refused = fuzz_files(tmp_path, "c", (ROOT / "configs" / "smoke.yaml").read_text(),
                                np.random.default_rng(0), load_config, ConfigError, names_file=True)
    overrides = ["a", "=", "fleet=1", "fleet.num_envs=", "fleet.num_envs=[", "run.seed=abc", "x.y.z=1",
                 "env.frame_size=[1]", "grpo.lr=-1", "policy=null", "eval.methods=[nope]"]
    for o in overrides:
        tried += 1
        try:
            load_config(ROOT / "configs" / "smoke.yaml", [o])
        except ConfigError:
            refused += 1
    print(f"config fuzz: {tried} tried, {refused} refused with ConfigError, 0 other exceptions")
    assert refused > tried // 2  # most corruptions are errors; the rest loaded as valid configs


def test_html_spec_loader_refuses_every_malformed_spec_with_one_game_error(tmp_path):
    spec_text = (PACK_DIR / "cannon.yaml").read_text()
    (tmp_path / yaml.safe_load(spec_text)["entry"]).write_text("<canvas id='game'></canvas>")

    def load(path):
        spec = load_spec(path)
        spec.check_entry()
        spec.game_info()

    tried, refused = fuzz_files(tmp_path, "s", spec_text, np.random.default_rng(1), load, GameError)
    print(f"HTML spec fuzz: {tried} tried, {refused} refused with GameError, 0 other exceptions")
    assert refused > tried // 2


def test_desktop_spec_loader_refuses_every_malformed_spec_with_one_game_error(tmp_path):
    """The shipped X-Moto spec (its template image copied beside it) corrupted 300 ways: each loads or is
    refused with one GameError naming the file; loading neither starts the game nor its display."""
    import shutil

    from ipr_dist.games.desktop_spec import DESKTOP_DIR, load_desktop_spec

    shutil.copytree(DESKTOP_DIR / "xmoto", tmp_path / "xmoto")
    spec_text = (DESKTOP_DIR / "xmoto.yaml").read_text()

    def load(path):
        spec = load_desktop_spec(path)
        spec.game_info()
        spec.pixel_readers()

    tried, refused = fuzz_files(tmp_path, "d", spec_text, np.random.default_rng(2), load, GameError, names_file=True)
    print(f"desktop spec fuzz: {tried} tried, {refused} refused with GameError, 0 other exceptions")
    assert refused > tried // 2
