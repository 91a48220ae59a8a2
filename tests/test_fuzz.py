"""Bad input never becomes a traceback: seeded fuzzing of the config loader and the HTML game-spec loader
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


def test_config_loader_refuses_every_malformed_file_with_one_config_error(tmp_path):
    rng = np.random.default_rng(0)
    base_text = (ROOT / "configs" / "smoke.yaml").read_text()
    base = yaml.safe_load(base_text)
    tried = refused = 0
    for i in range(300):
        path = tmp_path / f"c{i}.yaml"
        if i % 3 == 0:
            path.write_text(corrupt_text(base_text, rng))
        else:
            path.write_text(yaml.safe_dump(mutate(base, rng), allow_unicode=True))
        tried += 1
        try:
            load_config(path)
        except ConfigError as exc:
            refused += 1
            message = str(exc)
            assert message and "\n" not in message.strip() and "Traceback" not in message, message
            assert str(path) in message or path.name in message, message
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
    rng = np.random.default_rng(1)
    spec_text = (PACK_DIR / "cannon.yaml").read_text()
    spec = yaml.safe_load(spec_text)
    (tmp_path / spec["entry"]).write_text("<canvas id='game'></canvas>")
    tried = refused = 0
    for i in range(300):
        path = tmp_path / f"s{i}.yaml"
        if i % 3 == 0:
            path.write_text(corrupt_text(spec_text, rng))
        else:
            path.write_text(yaml.safe_dump(mutate(spec, rng), allow_unicode=True))
        tried += 1
        try:
            loaded = load_spec(path)
            loaded.check_entry()
            loaded.game_info()
        except GameError as exc:
            refused += 1
            assert str(exc) and "Traceback" not in str(exc)
    print(f"HTML spec fuzz: {tried} tried, {refused} refused with GameError, 0 other exceptions")
    assert refused > tried // 2
