"""Run-config loading for train.py: strict keys, overrides, the queue / global-batch check, the
DeepSpeed config the trainer builds, and a missing data path through the real CLI."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from blipfast.config import ConfigError
from blipfast.train.config import build_deepspeed_config, load_run_config
from tests.helpers import REPO



def write_run(tmp_path, train=None, data=None, top=None, ds=None):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds if ds is not None else {"zero_optimization": {"stage": 2}}))
    run = {"model": os.path.join(REPO, "configs", "blip_tiny.yaml"),
           "data": data if data is not None else {"format": "synthetic"},
           "train": train if train is not None else {"batch_size": 32},
           "deepspeed": str(ds_path)}
    run.update(top or {})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def test_shipped_configs_load():
    demo = load_run_config(os.path.join(REPO, "configs", "demo.yaml"))
    assert demo.train.grad_clip == 0.0 and demo.data.format == "synthetic"
    base_path = os.path.join(REPO, "configs", "pretrain_base.yaml")
    with pytest.raises(ConfigError, match="needs ann_files"):  # the user must say where the data is
        load_run_config(base_path)
    base = load_run_config(base_path, {"data.ann_files": ["/data/coco.json"]})
    t = base.train
    # the original's configs/pretrain.yaml
    assert (t.lr, t.warmup_steps, t.warmup_lr, t.lr_decay_rate, t.min_lr, t.weight_decay, t.epochs, t.batch_size) == \
        (3e-4, 3000, 1e-6, 0.9, 1e-6, 0.05, 20, 75)
    assert (base.model.queue_size, base.model.alpha, base.model.vision.image_size) == (57600, 0.4, 224)


@pytest.mark.parametrize("section,body,key", [
    ("train", {"batch_size": 32, "learning_rate": 1e-4}, "learning_rate"),
    ("data", {"format": "synthetic", "root": "x"}, "root"),
    ("top", {"optimiser": {}}, "optimiser"),
])
def test_unknown_key_names_key_and_file(tmp_path, section, body, key):
    path = write_run(tmp_path, **({"top": body} if section == "top" else {section: body}))
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert repr(key) in str(e.value) and "run.yaml" in str(e.value)


def test_unknown_key_in_model_file_and_override(tmp_path):
    path = write_run(tmp_path)
    with pytest.raises(ConfigError, match="blip_tiny.yaml.*'widht'"):
        load_run_config(path, {"model.vision.widht": 64})
    with pytest.raises(ConfigError, match="'nope'"):
        load_run_config(path, {"nope.x": 1})


def test_overrides_apply(tmp_path):
    run = load_run_config(write_run(tmp_path), {"train.lr": 1e-4, "model.vision.depth": 2,
                                                "data.synthetic.num_train": 64})
    assert run.train.lr == 1e-4 and run.model.vision.depth == 2 and run.data.synthetic.num_train == 64


def test_bad_values(tmp_path):
    for train, msg in (({"precision": "fp8"}, "precision"), ({"nan_policy": "ignore"}, "nan_policy"),
                       ({"grad_accum": 0}, "grad_accum")):
        with pytest.raises(ConfigError, match=msg):
            load_run_config(write_run(tmp_path, train=train))


def test_queue_size_must_divide_by_global_batch(tmp_path):
    run = load_run_config(write_run(tmp_path, train={"batch_size": 24}))  # queue 256
    with pytest.raises(ConfigError, match=r"queue_size 256 is not a multiple of the global batch 48 "
                                          r"\(train.batch_size 24 x world size 2\)"):
        run.check_world(2)
    ok = load_run_config(write_run(tmp_path, train={"batch_size": 32}))
    ok.check_world(2)  # 256 = 4 x 64
    with pytest.raises(ConfigError, match="global batch 96"):
        ok.check_world(3)


def test_deepspeed_config_from_yaml(tmp_path):
    run = load_run_config(write_run(tmp_path, train={"batch_size": 32, "grad_accum": 2, "precision": "bf16"}))
    ds = build_deepspeed_config(run, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 128
    assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed's own default would clip at 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_deepspeed_json_conflicts_are_errors(tmp_path):
    run = load_run_config(write_run(tmp_path, ds={"gradient_clipping": 1.0, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="gradient_clipping=1.0 conflicts with train.grad_clip=0.0"):
        build_deepspeed_config(run, 1)
    run = load_run_config(write_run(tmp_path, ds={"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="bf16.enabled=True conflicts with train.precision='fp32'"):
        build_deepspeed_config(run, 1)
    run = load_run_config(write_run(tmp_path, ds={"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        build_deepspeed_config(run, 1)


def test_missing_data_path_cli(tmp_path):
    """The real entry point, one process: a clear message and exit code 2, before training."""
    missing = tmp_path / "nowhere" / "ann.json"
    path = write_run(tmp_path, data={"format": "json", "ann_files": [str(missing)], "backend": "torch"},
                     train={"batch_size": 32, "output_dir": str(tmp_path / "out")})
    env = dict(os.environ, MASTER_PORT="0")
    env.pop("RANK", None)
    p = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config", path],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"annotation file not found: {missing}" in p.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
