from pathlib import Path

import re

import pytest
import yaml

from ipr_dist.config import Config, dump_config, load_config
from ipr_dist.errors import ConfigError
from ipr_dist.runlog import save_config

pytestmark = pytest.mark.unit  # no Ray cluster, no browser: `pytest -m unit`

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)


def test_defaults_are_the_papers():
    cfg = Config()
    assert cfg.env.frame_skip == 1  # native frame rate, paper Sec. 9.2
    assert cfg.env.max_episode_steps == 14_400  # 4 minutes at 60 FPS


def test_set_overrides_nested_values():
    cfg = load_config(ROOT / "configs/local.yaml", ["fleet.num_envs=5", "env.frame_size=[32, 48]", "run.name=x"])
    assert cfg.fleet.num_envs == 5
    assert cfg.env.frame_size == (32, 48)
    assert cfg.run_dir == "runs/x"


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fleet:\n  num_env: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert str(bad) in msg and "fleet.num_env" in msg and "num_envs" in msg
    assert "\n" not in msg


def test_invalid_value_names_key_and_allowed_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fleet:\n  action_source: clever\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "fleet.action_source" in msg and "'random'" in msg and "'scripted'" in msg and "clever" in msg


@pytest.mark.parametrize("override,needle", [("fleet.num_envs=0", "greater than or equal to 1"),
                                             ("fleet.num_envs", "KEY=VALUE"),
                                             ("nosuch.thing=1", "unknown key 'nosuch'"),
                                             ("policy.backend=vllm", "policy.frame_adapter .* vLLM cannot serve"),
                                             ("world_model.imagined_return=mean", "'reward' or 'q_sum'"),
                                             ("run.name=a/b", r"run\.name.*plain directory name"),
                                             ("run.name=.hidden", r"run\.name.*plain directory name"),
                                             ("grpo.update_batch=9", r"update_batch \(9\) must be at most 2 x tolerance"),
                                             ("grpo.fsdp=true", r"grpo\.fsdp .*grpo\.learners >= 2"),
                                             ("policy.align_fsdp=true", r"policy\.align_fsdp .*policy\.workers >= 2"),
                                             ("eval.methods=[random, random]", "methods are listed twice"),
                                             ("eval.methods=[sac]", "unknown method 'sac'"),
                                             ("eval.held_out=[Airstriker-Genesis]", "leave at least one"),
                                             ("fleet.num_envs.x=1", r"'num_envs' is a value, not a section"),
                                             ("fleet.num_envs=[1", "is not valid YAML")])
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/smoke.yaml", [override])
    assert re.search(needle, str(err.value)), str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("fleet: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(broken)


def test_resolved_config_is_saved_and_older_one_kept(tmp_path):
    cfg = load_config(ROOT / "configs/smoke.yaml", [f"run.root={tmp_path}"])
    path = Path(save_config(cfg))
    assert yaml.safe_load(path.read_text())["fleet"]["num_envs"] == cfg.fleet.num_envs
    assert load_config(path) == cfg  # the saved file is itself a valid preset
    cfg2 = load_config(ROOT / "configs/smoke.yaml", [f"run.root={tmp_path}", "fleet.num_envs=3"])
    save_config(cfg2)
    assert len(list(path.parent.glob("config.*.yaml"))) == 1
    assert dump_config(cfg2) == path.read_text()


def test_a_moved_run_directory_is_the_run(tmp_path):
    """`ipr ... RUN` works on the directory given, not on the root and name the run was created with
    (a copied run must never write into the original)."""
    from types import SimpleNamespace

    from ipr_dist.cli import _run_config

    moved = tmp_path / "elsewhere" / "copy"
    moved.mkdir(parents=True)
    (moved / "config.yaml").write_text((ROOT / "configs/local.yaml").read_text())  # created as runs/local
    cfg = _run_config(SimpleNamespace(run=str(moved), set=["grpo.lr=3e-5"]))
    assert cfg.run_dir == str(moved) and cfg.grpo.lr == 3e-5
    with pytest.raises(Exception, match="not a run directory"):
        _run_config(SimpleNamespace(run=str(tmp_path), set=[]))
