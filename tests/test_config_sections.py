"""The one sectioned-YAML loader that train, eval and CapFilt share (blipfast.config)."""
import os
import shutil

import pytest
import yaml

from blipfast.config import ConfigError, load_model_section, split_sections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "blip_tiny.yaml")


def test_split_sections_sorts_overrides_and_names_bad_keys():
    whole, by = split_sections({"model": "m.yaml", "data": {}}, {"model.queue_size": 8, "task": "x", "data.a.b": 1},
                               ("task", "model", "data"), "run.yaml", required=("model",))
    assert whole == {"task": "x"} and by == {"task": {}, "model": {"queue_size": 8}, "data": {"a.b": 1}}
    with pytest.raises(ConfigError, match=r"run.yaml: unknown top-level key\(s\) 'trian'; valid: model, data"):
        split_sections({"trian": {}}, {}, ("model", "data"), "run.yaml")
    with pytest.raises(ConfigError, match=r"override 'modle.x': unknown section 'modle'"):
        split_sections({}, {"modle.x": 1}, ("model", "data"), "run.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml: missing section\(s\) data"):
        split_sections({"model": {}}, {}, ("model", "data"), "run.yaml", required=("model", "data"))


def test_a_model_is_found_through_run_files_and_output_directories(tmp_path):
    shutil.copy(TINY, tmp_path / "tiny.yaml")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": "tiny.yaml", "data": {}}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"model": yaml.safe_load(open(TINY)), "data": {}}))
    direct = load_model_section(str(tmp_path / "tiny.yaml"), str(tmp_path), "here", {})
    for value in ("tiny.yaml", "run.yaml", str(out)):
        cfg = load_model_section(value, str(tmp_path), "here", {"queue_size": 128})
        assert cfg.queue_size == 128 and cfg.text == direct.text and cfg.vision == direct.vision, value
    with pytest.raises(ConfigError, match="unknown key"):
        load_model_section("tiny.yaml", str(tmp_path), "here", {"no_such_key": 1})
    with pytest.raises(ConfigError, match="a model must be a path to a model YAML or a mapping"):
        load_model_section(3, str(tmp_path), "here", {})
