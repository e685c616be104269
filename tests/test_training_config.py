"""Config system: YAML/--set overrides, unknown keys with suggestions, bundled configs, run-folder refusal."""

import glob
import os

import pytest
import yaml

from cxrkeras.config import Config, config_from_dict, dump_yaml, load_config, parse_set
from cxrkeras.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def test_defaults_yaml_and_set_layering(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3.0e-4\n  schedule: cosine\ntrain:\n  epochs: 7\n")
    cfg = load_config(str(path), {"train": {"epochs": 9}}, ["loss.gamma=1.5", "model.weights=none",
                                                            "model.overrides={blocks: [1, 1, 1, 1]}"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.schedule == "cosine"
    assert cfg.train.epochs == 9  # options beat the file
    assert cfg.loss.gamma == 1.5 and cfg.model.weights is None
    assert cfg.model.overrides == {"blocks": [1, 1, 1, 1]}
    assert cfg.data.batch_size == Config().data.batch_size  # untouched keys keep the defaults
    # the resolved config round-trips through the YAML written into the run folder
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


@pytest.mark.parametrize("text, key, suggestion", [
    ("optim:\n  learning_rate: 0.1\n", "optim.learning_rate", "optim.lr"),
    ("train:\n  epoch: 3\n", "train.epoch", "train.epochs"),
    ("optimizer:\n  lr: 0.1\n", "optimizer", "optim"),
])
def test_unknown_key_is_named_with_the_closest(tmp_path, text, key, suggestion):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    msg = str(exc.value)
    assert f"'{key}'" in msg and f"did you mean '{suggestion}'" in msg and "bad.yaml" in msg


def test_bad_values_and_set_syntax():
    with pytest.raises(ConfigError, match="optim.schedule must be one of"):
        load_config(sets=["optim.schedule=cosin"])
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        load_config(sets=["train.epochs=two"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set(["epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


def test_every_bundled_config_loads_and_names_a_registered_variant():
    from cxrkeras.models.registry import list_variants

    files = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
    names = {os.path.basename(f) for f in files}
    for expected in ("densenet121_lka_after.yaml", "densenet121_lka_last2.yaml", "densenet121_lka_full.yaml",
                     "vgg16_lka_after.yaml", "vgg16_lka_last3.yaml", "vgg16_lka_full.yaml", "densenet121.yaml",
                     "vgg16_bn.yaml", "demo.yaml"):
        assert expected in names
    for path in files:
        cfg = load_config(path)
        assert cfg.model.variant in list_variants(), path


def test_run_folder_of_a_different_config_is_refused(tmp_path):
    from cxrkeras.training.rundir import prepare_stage_dir, write_config

    cfg = load_config(overrides={"run": {"root": str(tmp_path), "name": "r"}})
    path, state = prepare_stage_dir(cfg, 1)
    assert state == "new"
    write_config(path, cfg)
    assert prepare_stage_dir(cfg, 1)[1] == "resume"  # same config: continue
    other = load_config(overrides={"run": {"root": str(tmp_path), "name": "r"}, "optim": {"lr": 0.5}})
    with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.0001 -> 0.5\).*--overwrite"):
        prepare_stage_dir(other, 1)
    other.run.overwrite = True
    assert prepare_stage_dir(other, 1, overwrite=True)[1] == "new"
    assert not os.listdir(path)


def test_configs_readme_defaults_are_generated_from_the_dataclasses():
    """configs/README.md's defaults block is `python -m cxrkeras.config`'s output: it cannot drift from the code."""
    import dataclasses

    from cxrkeras.config import defaults_yaml, main, readme_with_defaults

    path = os.path.join(CONFIGS, "README.md")
    text = open(path, encoding="utf-8").read()
    assert readme_with_defaults(text) == text, "run: python -m cxrkeras.config --write configs/README.md"
    assert main(["--check", path]) == 0
    block = yaml.safe_load(defaults_yaml())
    assert config_from_dict(block) == Config()  # the documented values are the defaults, every key of them
    for section in dataclasses.fields(Config):
        assert set(block[section.name]) == {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
    edited = text.replace("  lr: 0.0001", "  lr: 0.001")
    assert edited != text and readme_with_defaults(edited) == text  # a hand-edited default is put back


def test_data_cache_takes_a_flag_or_a_folder(tmp_path):
    assert load_config(sets=["data.cache=true"]).data.cache is True
    assert load_config(sets=["data.cache=off"]).data.cache is False
    assert load_config(sets=[f"data.cache={tmp_path / 'cache'}"]).data.cache == str(tmp_path / "cache")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="data.cache .* is a file: give a folder"):
        load_config(sets=[f"data.cache={tmp_path / 'file'}"])
    with pytest.raises(ConfigError, match="expected true, false or a folder path"):
        load_config(overrides={"data": {"cache": 3}})
