"""Tests for epsdist.config: YAML -> dataclasses, overrides, validation, atomic save."""
import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import pytest
import yaml

from epsdist import config as C
from epsdist.config import (ConfigError, EPSConfig, add_config_args, config_from_args,
                            dump_yaml, from_dict, load_config, save_config, to_dict)


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- loading


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == EPSConfig()
    assert cfg.seed == 0
    assert cfg.run.dir == "runs/default" and cfg.run.keep_last == 3
    assert cfg.data.num_classes == 20 and cfg.data.resize_long == (256, 512)
    assert cfg.model.backbone == "resnet38" and cfg.model.weights == "none"
    assert cfg.model.eps_head is True
    assert cfg.loss.tau == 0.4 and cfg.loss.lam == 0.5 and cfg.loss.bg_classes == []
    assert cfg.train.global_batch_size == 8 and cfg.train.precision == "bf16"
    assert cfg.train.weight_decay == 5e-4 and cfg.train.zero_stage == 0


def test_default_list_not_shared():
    a, b = EPSConfig(), EPSConfig()
    a.loss.bg_classes.append(3)
    assert b.loss.bg_classes == []


def test_load_yaml_values_and_defaults_fill_missing(tmp_path):
    p = write(tmp_path, """
seed: 7
data:
  train_shards: /data/voc/train
  num_classes: 80
  resize_long: [320, 640]
model:
  backbone: resnet101
  eps_head: false
loss:
  lam: 0.9
  bg_classes: [0, 14]
train:
  lr: 0.02
  precision: fp16
""")
    cfg = load_config(p)
    assert cfg.seed == 7
    assert cfg.data.train_shards == "/data/voc/train"
    assert cfg.data.num_classes == 80
    assert cfg.data.resize_long == (320, 640)
    assert isinstance(cfg.data.resize_long, tuple)
    assert cfg.model.backbone == "resnet101" and cfg.model.eps_head is False
    assert cfg.loss.lam == 0.9 and cfg.loss.bg_classes == [0, 14]
    assert cfg.train.lr == 0.02 and cfg.train.precision == "fp16"
    # untouched keys keep their defaults, in touched and untouched sections alike
    assert cfg.data.crop_size == 448 and cfg.data.val_shards == ""
    assert cfg.loss.tau == 0.4 and cfg.loss.strategy == "adaptive"
    assert cfg.train.global_batch_size == 8
    assert cfg.run == C.RunConfig()


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == EPSConfig()


def test_int_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\n  grad_clip: 5\n"))
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.train.grad_clip) is float


def test_exponent_without_dot_accepted_for_float(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string; float fields accept that form.
    assert yaml.safe_load("x: 1e-4")["x"] == "1e-4"
    cfg = load_config(write(tmp_path, "train:\n  weight_decay: 1e-4\n"))
    assert cfg.train.weight_decay == pytest.approx(1e-4)


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "sed: 3\n"))
    msg = str(e.value)
    assert "'sed'" in msg and "seed" in msg and "cfg.yaml" in msg


def test_unknown_nested_key_names_full_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  lrr: 0.1\n"))
    msg = str(e.value)
    assert "'train.lrr'" in msg
    assert "batch_size" in msg and "lr" in msg  # known keys are listed


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("text, path, expected", [
    ("train:\n  batch_size: eight\n", "train.batch_size", "int"),
    ("train:\n  batch_size: 8.5\n", "train.batch_size", "int"),
    ("model:\n  eps_head: 1\n", "model.eps_head", "bool"),
    ("model:\n  eps_head: 'yes'\n", "model.eps_head", "bool"),
    ("seed: true\n", "seed", "int"),
    ("run:\n  name: 5\n", "run.name", "str"),
    ("loss:\n  bg_classes: 3\n", "loss.bg_classes", "list"),
    ("loss:\n  tau: high\n", "loss.tau", "float"),
])
def test_type_errors_name_path_and_type(tmp_path, text, path, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert f"'{path}'" in msg and expected in msg


def test_list_item_type_error_names_index(tmp_path):
    with pytest.raises(ConfigError, match=r"loss\.bg_classes\[1\]"):
        load_config(write(tmp_path, "loss:\n  bg_classes: [1, x]\n"))


def test_tuple_wrong_length(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.resize_long.*2 items"):
        load_config(write(tmp_path, "data:\n  resize_long: [1, 2, 3]\n"))


def test_wrong_literal_lists_choices(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "model:\n  backbone: vgg16\n"))
    msg = str(e.value)
    assert "'model.backbone'" in msg and "vgg16" in msg
    for choice in ("resnet38", "resnet50", "resnet101", "tiny"):
        assert choice in msg


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="'train'.*mapping"):
        load_config(write(tmp_path, "train: 3\n"))


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(p)


def test_non_mapping_yaml(tmp_path):
    p = write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(p)


def test_yaml_syntax_error(tmp_path):
    p = write(tmp_path, "train: {lr: 0.1\n", "broken.yaml")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(p)


# ----------------------------------------------------------------------------- overrides


def test_overrides_each_kind(tmp_path):
    p = write(tmp_path, "train:\n  lr: 0.1\n  batch_size: 4\n")
    cfg = load_config(p, [
        "train.lr=0.05",             # float, overrides the file
        "model.eps_head=false",      # bool
        "loss.bg_classes=[0, 14]",   # list
        "data.resize_long=[300,400]",  # tuple from list
        "seed=3",                    # top-level int
        "run.name=001",              # str keeps raw text
        "train.weight_decay=1e-4",   # float in exponent form
        "loss.strategy=naive",       # Literal
    ])
    assert cfg.train.lr == 0.05
    assert cfg.train.batch_size == 4  # from the file, untouched by overrides
    assert cfg.model.eps_head is False
    assert cfg.loss.bg_classes == [0, 14]
    assert cfg.data.resize_long == (300, 400)
    assert cfg.seed == 3
    assert cfg.run.name == "001"
    assert cfg.train.weight_decay == pytest.approx(1e-4)
    assert cfg.loss.strategy == "naive"


def test_str_override_keeps_raw_text():
    cfg = load_config(None, ["run.dir=123", "model.weights=null", "data.train_shards="])
    assert cfg.run.dir == "123"
    assert cfg.model.weights == "null"
    assert cfg.data.train_shards == ""


def test_later_override_wins():
    assert load_config(None, ["seed=1", "seed=2"]).seed == 2


def test_section_override_with_mapping_merges(tmp_path):
    p = write(tmp_path, "loss:\n  lam: 0.9\n")
    cfg = load_config(p, ["loss={tau: 0.3, strategy: naive}"])
    assert cfg.loss.tau == 0.3 and cfg.loss.strategy == "naive"
    assert cfg.loss.lam == 0.9  # kept from the file


@pytest.mark.parametrize("override, pattern", [
    ("train.lr", r"key\.sub=value"),
    ("=3", r"key\.sub=value"),
    ("train.lrr=0.1", r"'train\.lrr'"),
    ("nosuch.key=1", r"'nosuch'"),
    ("seed.sub=1", r"'seed'"),
    ("loss=3", r"'loss'.*section"),
    ("train.batch_size=abc", r"'train\.batch_size'.*int"),
    ("train.batch_size=2.5", r"'train\.batch_size'.*int"),
    ("model.eps_head=1", r"'model\.eps_head'.*bool"),
    ("model.backbone=vgg", r"'model\.backbone'.*resnet38"),
    ("loss.bg_classes=[1,", r"not valid YAML"),
    ("loss={tauu: 1}", r"'loss\.tauu'"),
])
def test_bad_overrides(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


@dataclass
class _Inner:
    """Test section."""

    tag: Optional[str] = None
    size: Optional[int] = 4
    pair: tuple[float, ...] = (1.0,)


@dataclass
class _Outer:
    """Test schema with Optional fields."""

    inner: _Inner = field(default_factory=_Inner)
    name: str = "x"


def test_optional_fields_and_custom_schema(tmp_path):
    cfg = load_config(None, ["inner.size=null", "inner.tag=abc", "inner.pair=[1, 2.5, 3]"],
                      cls=_Outer)
    assert cfg.inner.size is None and cfg.inner.tag == "abc"
    assert cfg.inner.pair == (1.0, 2.5, 3.0)
    cfg = load_config(None, ["inner.tag=null", "inner.size=7"], cls=_Outer)
    assert cfg.inner.tag is None and cfg.inner.size == 7
    assert load_config(None, ["inner.tag=12"], cls=_Outer).inner.tag == "12"
    with pytest.raises(ConfigError, match=r"'inner\.size'"):
        load_config(None, ["inner.size=big"], cls=_Outer)
    p = write(tmp_path, "inner:\n  tag: null\n  size: null\n")
    assert load_config(p, cls=_Outer) == _Outer(_Inner(tag=None, size=None))


def test_from_dict_directly():
    cfg = from_dict(EPSConfig, {"train": {"max_iters": 10}})
    assert cfg.train.max_iters == 10
    with pytest.raises(ConfigError, match=r"'a\.b\.train\.x'"):
        from_dict(EPSConfig, {"train": {"x": 1}}, path="a.b")
    with pytest.raises(ConfigError, match="mapping"):
        from_dict(EPSConfig, [1, 2])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("override, path", [
    ("loss.lam=1.5", "loss.lam"),
    ("loss.lam=-0.1", "loss.lam"),
    ("loss.tau=2", "loss.tau"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("train.micro_batch_size=-1", "train.micro_batch_size"),
    ("train.max_iters=0", "train.max_iters"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("data.resize_long=[512,256]", "data.resize_long"),
    ("loss.bg_classes=[20]", "loss.bg_classes[0]"),
    ("loss.bg_classes=[0,-1]", "loss.bg_classes[1]"),
    # issue #14: values that trained into garbage or failed only after the ranks started
    ("train.momentum=5", "train.momentum"),
    ("train.momentum=1", "train.momentum"),
    ("train.poly_power=-1", "train.poly_power"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("loss.saliency_weight=-1", "loss.saliency_weight"),
    ("train.lr=1e999", "train.lr"),
    ("train.lr=.inf", "train.lr"),
    ("loss.saliency_weight=.nan", "loss.saliency_weight"),
    ("infer.scales=[1.0,.inf]", "infer.scales[1]"),
    ("run.dist_timeout_s=.inf", "run.dist_timeout_s"),
    ("run.dir=", "run.dir"),
    ("run.dir=' '", "run.dir"),
    ("run.panel_every=-1", "run.panel_every"),
    ("data.resize_long=[0,10]", "data.resize_long"),
    ("seed=-1", "seed"),
    ("seed=5000000", "seed"),
    ("model.output_stride=16", "model.output_stride"),
    ("train.max_skipped_fraction=1.5", "train.max_skipped_fraction"),
    ("train.max_consecutive_skips=0", "train.max_consecutive_skips"),
])
def test_range_validation(override, path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"'{path}'" in str(e.value)


def test_range_boundaries_accepted():
    cfg = load_config(None, ["loss.lam=0", "loss.tau=1", "train.zero_stage=3",
                             "data.resize_long=[300,300]", "loss.bg_classes=[0,19]"])
    assert cfg.loss.lam == 0.0 and cfg.train.zero_stage == 3
    cfg = load_config(None, ["train.momentum=0", "train.weight_decay=0", "train.poly_power=0",
                             "train.grad_clip=0", "loss.saliency_weight=0", "seed=4000000",
                             "data.resize_long=[1,1]", "run.panel_every=0",
                             "train.max_skipped_fraction=1", "train.max_consecutive_skips=1",
                             "model.backbone=resnet50", "model.output_stride=16"])
    assert cfg.train.momentum == 0.0 and cfg.model.output_stride == 16


def test_seg_config_checks_the_shared_ranges():
    from epsdist.config import SegConfig
    for override, path in (("train.momentum=5", "train.momentum"), ("run.dir=", "run.dir"),
                           ("data.scale_range=[0.5,.inf]", "data.scale_range[1]"),
                           ("eval.crf_bi_w=.inf", "eval.crf_bi_w")):
        with pytest.raises(ConfigError, match=re.escape(f"'{path}'")):
            load_config(None, [override], SegConfig)


def test_bg_classes_checked_against_num_classes_from_file(tmp_path):
    p = write(tmp_path, "data:\n  num_classes: 80\nloss:\n  bg_classes: [60]\n")
    assert load_config(p).loss.bg_classes == [60]
    with pytest.raises(ConfigError, match=r"loss\.bg_classes\[0\]"):
        load_config(p, ["data.num_classes=20"])


def test_validation_reports_all_errors():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.lam=2", "train.global_batch_size=0"])
    assert "loss.lam" in str(e.value) and "train.global_batch_size" in str(e.value)


# ----------------------------------------------------------------------------- save


def _custom_cfg():
    return load_config(None, ["seed=5", "run.name=001", "data.resize_long=[300,600]",
                              "loss.bg_classes=[3,7]", "train.lr=0.003", "model.eps_head=false",
                              "train.precision=fp32", "data.train_shards=/x/y z"])


def test_to_dict_plain_types():
    d = to_dict(_custom_cfg())
    assert d["data"]["resize_long"] == [300, 600] and type(d["data"]["resize_long"]) is list
    assert d["loss"]["bg_classes"] == [3, 7]
    assert d["run"]["name"] == "001" and d["seed"] == 5
    assert set(d) == {f.name for f in dataclasses.fields(EPSConfig)}


def test_save_load_round_trip(tmp_path):
    cfg = _custom_cfg()
    p = tmp_path / "out" / "config.yaml"  # parent created on demand
    save_config(cfg, p)
    assert load_config(p) == cfg
    assert yaml.safe_load(p.read_text()) == to_dict(cfg)
    assert yaml.safe_load(dump_yaml(cfg)) == to_dict(cfg)
    assert load_config(None) == EPSConfig()
    save_config(EPSConfig(), p)
    assert load_config(p) == EPSConfig()


def test_save_leaves_no_temp_files(tmp_path):
    save_config(_custom_cfg(), tmp_path / "config.yaml")
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "config.yaml"
    save_config(EPSConfig(), p)
    old = p.read_text()

    def boom(*a, **k):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(yaml, "safe_dump", boom)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        save_config(_custom_cfg(), p)
    assert p.read_text() == old
    assert os.listdir(tmp_path) == ["config.yaml"]


# ----------------------------------------------------------------------------- argparse


def test_argparse_helpers(tmp_path):
    p = write(tmp_path, "train:\n  batch_size: 2\n")
    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args(["--config", str(p), "train.lr=0.5", "seed=9"])
    assert args.config == str(p) and args.overrides == ["train.lr=0.5", "seed=9"]
    cfg = config_from_args(args)
    assert cfg.train.batch_size == 2 and cfg.train.lr == 0.5 and cfg.seed == 9

    args = parser.parse_args([])
    assert args.config is None and args.overrides == []
    assert config_from_args(args) == EPSConfig()

    args = parser.parse_args(["inner.size=1"])
    assert config_from_args(args, cls=_Outer).inner.size == 1

    with pytest.raises(ConfigError, match="key.sub=value"):
        config_from_args(parser.parse_args(["oops"]))


def test_every_shipped_recipe_loads():
    import glob
    from epsdist.config import load_config
    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
    assert paths, "configs/ holds no recipe"
    for path in paths:
        if path.endswith("_seg.yaml"):                  # segmentation-stage recipes
            from epsdist.config import SegConfig
            assert load_config(path, cls=SegConfig).data.num_classes >= 1
            continue
        cfg = load_config(path)
        assert 0 <= cfg.loss.lam <= 1 and cfg.data.num_classes >= 1
