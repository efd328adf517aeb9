"""Tests for epsdist.models: backbones, head, frozen layers, parameter groups, weight loading
(MXNet .params without MXNet, torchvision checkpoints). Every weight file is written here."""
import struct

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from epsdist.config import ModelConfig
from epsdist.models import (EPSNet, ResNet38, TinyBackbone, TorchvisionResNet, build_model,
                            count_parameters, load_resnet38_imagenet, load_torchvision_resnet,
                            param_groups)
from epsdist.models.mxnet_params import (MXNetFormatError, load_mxnet_params,
                                         mxnet_to_resnet38_name,
                                         resnet38_state_dict_from_mxnet, save_mxnet_params)

C = 20


def cfg(**kw):
    kw.setdefault("weights", "none")
    return ModelConfig(**kw)


def quiet(_msg):
    pass


# ----------------------------------------------------------------------------- MXNet helpers
# Written from the file-format description and the naming rules, independently of the module.

BN_MX = {"weight": ("arg", "gamma"), "bias": ("arg", "beta"),
         "running_mean": ("aux", "moving_mean"), "running_var": ("aux", "moving_var")}


def torch_to_mxnet(key):
    """ResNet-38 torch name -> the MXNet name of Wu et al.'s file (None: not in the file)."""
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    if parts[0] == "bn7":
        kind, suffix = BN_MX[parts[1]]
        return f"{kind}:bn7_{suffix}"
    block, layer, param = parts
    nums = block[1:].split("_")  # "b4_3" -> ["4", "3"], "b4" -> ["4"]
    unit = nums[0] + ("a" if len(nums) == 1 else f"b{nums[1]}")
    layer_kind, branch = layer.split("_", 1)
    if layer_kind == "conv":
        assert param == "weight"
        return f"arg:res{unit}_{branch}_weight"
    kind, suffix = BN_MX[param]
    return f"{kind}:bn{unit}_{branch}_{suffix}"


def mx_entry_v2(arr, flag, magic=0xF993FAC9, stype=0):
    return (struct.pack(f"<Iii{arr.ndim}q", magic, stype, arr.ndim, *arr.shape)
            + struct.pack("<iii", 1, 0, flag) + arr.tobytes())


def mx_entry_legacy(arr, flag):
    return (struct.pack(f"<I{arr.ndim}I", arr.ndim, *arr.shape)
            + struct.pack("<iii", 2, 0, flag) + arr.tobytes())  # saved from gpu(0)


def mx_file(entries, names):
    out = struct.pack("<QQQ", 0x112, 0, len(entries)) + b"".join(entries)
    out += struct.pack("<Q", len(names))
    for n in names:
        out += struct.pack("<Q", len(n.encode())) + n.encode()
    return out


@pytest.fixture(scope="module")
def r38():
    """One ResNet-38 EPSNet for the module (~105M parameters: build it once)."""
    torch.manual_seed(0)
    return build_model(cfg(backbone="resnet38"), C, log=quiet)


@pytest.fixture(scope="module")
def r38_params(r38, tmp_path_factory):
    """The full ResNet-38 as an MXNet .params file (Wu et al.'s names, with linear1000)."""
    path = tmp_path_factory.mktemp("mx") / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    arrays = {}
    for k, v in r38.backbone.state_dict().items():
        name = torch_to_mxnet(k)
        if name is not None:
            arrays[name] = v.numpy()
    arrays["arg:linear1000_weight"] = np.full((1000, 4096), 0.5, np.float32)
    arrays["arg:linear1000_bias"] = np.zeros(1000, np.float32)
    save_mxnet_params(path, arrays)
    return path


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("eps_head,k", [(True, C + 1), (False, C)])
def test_tiny_shapes_and_head(eps_head, k):
    m = build_model(cfg(backbone="tiny", eps_head=eps_head), C, log=quiet)
    assert isinstance(m, EPSNet) and isinstance(m.backbone, TinyBackbone)
    assert (m.num_classes, m.num_maps, m.output_stride) == (C, k, 8)
    assert m.head.bias is None and m.head.weight.shape == (k, 128, 1, 1)
    out = m(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, k, 14, 14)
    assert m(torch.randn(1, 3, 96, 80)).shape == (1, k, 12, 10)


def test_tiny_channels_last_and_norm_trainable():
    m = build_model(cfg(backbone="tiny"), C, log=quiet).to(memory_format=torch.channels_last)
    m.train()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    out = m(x)
    assert out.shape == (2, C + 1, 8, 8)
    out.float().mean().backward()
    norms = [mod for mod in m.modules() if isinstance(mod, nn.GroupNorm)]
    assert norms and all(b.weight.requires_grad for b in norms)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("depth,stride,hw", [(50, 8, 8), (50, 16, 4), (101, 16, 4)])
def test_torchvision_resnet_shapes(depth, stride, hw):
    m = build_model(cfg(backbone=f"resnet{depth}", output_stride=stride), C, log=quiet)
    assert isinstance(m.backbone, TorchvisionResNet)
    assert m.output_stride == stride and m.head.weight.shape == (C + 1, 2048, 1, 1)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, C + 1, hw, hw)


def test_output_stride_errors_name_the_key():
    with pytest.raises(ValueError, match="model.output_stride"):
        build_model(cfg(backbone="resnet38", output_stride=16), C, log=quiet)
    with pytest.raises(ValueError, match="model.output_stride"):
        build_model(cfg(backbone="resnet50", output_stride=4), C, log=quiet)


def test_resnet38_shapes_and_names(r38):
    assert isinstance(r38.backbone, ResNet38)
    assert (r38.num_maps, r38.output_stride) == (C + 1, 8)
    assert r38.head.bias is None and r38.head.weight.shape == (C + 1, 4096, 1, 1)
    r38.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        feats = r38.backbone.forward_features(x)
        out = r38(x)
    assert out.shape == (1, C + 1, 4, 4)
    assert feats["conv4"].shape == (1, 512, 4, 4)
    assert feats["conv5"].shape == (1, 1024, 4, 4)
    assert feats["conv6"].shape == (1, 4096, 4, 4) and feats["conv6"].min() >= 0
    names = {n for n, _ in r38.backbone.named_children()}
    assert names >= {"conv1a", "b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_5",
                     "b5", "b5_1", "b5_2", "b6", "b7", "bn7"}
    sd = r38.backbone.state_dict()
    assert sd["b7.conv_branch2b2.weight"].shape == (4096, 2048, 1, 1)
    assert sd["b6.conv_branch2b1.weight"].shape == (1024, 512, 3, 3)
    assert sd["b5.conv_branch1.weight"].shape == (1024, 512, 1, 1)
    assert "b3_1.conv_branch1.weight" not in sd  # same-shape units have no projection
    assert r38.backbone.b6.conv_branch2b1.dilation == (4, 4)
    assert r38.backbone.b5.conv_branch2a.dilation == (1, 1)
    assert r38.backbone.b5_1.conv_branch2a.dilation == (2, 2)
    assert r38.backbone.b6.dropout_2b1.p == 0.3 and r38.backbone.b7.dropout_2b2.p == 0.5
    total, _ = count_parameters(r38.backbone)
    assert 104e6 < total < 106e6


# ----------------------------------------------------------------------------- frozen layers


def test_resnet38_bn_eval_and_frozen_layers(r38):
    bb = r38.backbone
    r38.train()
    bns = [m for m in r38.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns)
    assert bb.b6.dropout_2b1.training and r38.training
    before = bb.b3.bn_branch2a.running_mean.clone()
    r38.zero_grad(set_to_none=True)
    r38(torch.randn(1, 3, 32, 32)).mean().backward()
    assert torch.equal(bb.b3.bn_branch2a.running_mean, before)  # statistics not updated
    frozen = [bb.conv1a, bb.b2, bb.b2_1, bb.b2_2] + bns
    for mod in frozen:
        for p in mod.parameters():
            assert not p.requires_grad and p.grad is None
    assert bb.b3.conv_branch2a.weight.grad is not None and r38.head.weight.grad is not None
    r38.eval()
    assert not bb.b6.dropout_2b1.training
    r38.zero_grad(set_to_none=True)


def test_torchvision_resnet_frozen_stem_and_bn():
    m = build_model(cfg(backbone="resnet50", output_stride=16), C, log=quiet)
    m.train()
    bb = m.backbone
    assert not any(x.training for x in m.modules() if isinstance(x, nn.BatchNorm2d))
    m(torch.randn(1, 3, 32, 32)).mean().backward()
    for mod in (bb.conv1, bb.bn1, bb.layer1):
        assert all(not p.requires_grad and p.grad is None for p in mod.parameters())
    assert all(not p.requires_grad for x in m.modules() if isinstance(x, nn.BatchNorm2d)
               for p in x.parameters())
    assert bb.layer4[0].conv2.weight.grad is not None
    assert bb.layer4[1].conv2.dilation == (2, 2)  # stride 16: layer4 dilated


# ----------------------------------------------------------------------------- param groups


def check_groups(model, groups):
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    mult = {g["name"]: (g["lr_mult"], g["weight_decay_on"]) for g in groups}
    expected = {"backbone_weight": (1, True), "backbone_bias": (2, False),
                "head_weight": (10, True), "head_bias": (20, False)}
    assert all(mult[n] == expected[n] for n in mult)
    return {g["name"]: g for g in groups}


def test_param_groups_resnet38(r38):
    groups = check_groups(r38, param_groups(r38))
    assert set(groups) == {"backbone_weight", "head_weight"}  # BN frozen, no conv biases
    assert groups["head_weight"]["params"] == [r38.head.weight]
    assert len(groups["backbone_weight"]["params"]) == 35  # convs of b3 ... b7
    full = param_groups(r38, keep_empty=True)
    assert [g["name"] for g in full] == ["backbone_weight", "backbone_bias", "head_weight",
                                         "head_bias"]


def test_param_groups_tiny_and_sgd():
    m = build_model(cfg(backbone="tiny"), C, log=quiet)
    groups = param_groups(m, lr=0.01, weight_decay=5e-4)
    named = check_groups(m, groups)
    bn_ids = {id(p) for x in m.modules() if isinstance(x, nn.GroupNorm) for p in x.parameters()}
    assert {id(p) for p in named["backbone_bias"]["params"]} == bn_ids
    assert named["backbone_bias"]["lr"] == pytest.approx(0.02)
    assert named["backbone_bias"]["weight_decay"] == 0.0
    assert named["head_weight"]["lr"] == pytest.approx(0.1)
    assert named["head_weight"]["weight_decay"] == 5e-4
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    m(torch.randn(2, 3, 32, 32)).mean().backward()
    opt.step()


def test_param_groups_bias_head_and_unknown_param():
    m = build_model(cfg(backbone="tiny"), C, log=quiet)
    m.head = nn.Conv2d(128, C + 1, 1, bias=True)
    named = check_groups(m, param_groups(m))
    assert named["head_bias"]["params"] == [m.head.bias]
    m.backbone.scale = nn.Parameter(torch.ones(1))  # a trainable parameter of no known layer
    with pytest.raises(ValueError, match="backbone.scale"):
        param_groups(m)


# ----------------------------------------------------------------------------- MXNet format


def test_mxnet_name_mapping_rules():
    cases = {
        "arg:conv1a_weight": "conv1a.weight",
        "arg:res2a_branch2a_weight": "b2.conv_branch2a.weight",
        "arg:res2a_branch1_weight": "b2.conv_branch1.weight",
        "arg:res2b1_branch2b1_weight": "b2_1.conv_branch2b1.weight",
        "arg:res4b5_branch2a_weight": "b4_5.conv_branch2a.weight",
        "arg:res7a_branch2b2_weight": "b7.conv_branch2b2.weight",
        "arg:bn2a_branch2a_gamma": "b2.bn_branch2a.weight",
        "arg:bn2a_branch2a_beta": "b2.bn_branch2a.bias",
        "aux:bn2a_branch2a_moving_mean": "b2.bn_branch2a.running_mean",
        "aux:bn2a_branch2a_moving_var": "b2.bn_branch2a.running_var",
        "aux:bn5b2_branch2b1_moving_var": "b5_2.bn_branch2b1.running_var",
        "arg:bn6a_branch2b2_gamma": "b6.bn_branch2b2.weight",
        "arg:bn7_gamma": "bn7.weight",
        "aux:bn7_moving_mean": "bn7.running_mean",
        "res3b2_branch2a_weight": "b3_2.conv_branch2a.weight",  # no prefix
        "arg:linear1000_weight": None,
        "arg:linear1000_bias": None,
        "arg:fc_something": "",
    }
    for mx, pt in cases.items():
        assert mxnet_to_resnet38_name(mx) == pt, mx
    sd = resnet38_state_dict_from_mxnet({"arg:linear1000_weight": np.zeros(2, np.float32),
                                         "arg:fc_something": np.ones(3, np.float32),
                                         "arg:conv1a_weight": np.ones(4, np.float32)})
    assert set(sd) == {"conv1a.weight", "fc_something"}  # unknown names kept -> "unexpected"


def test_every_resnet38_parameter_has_an_mxnet_name(r38):
    keys = [k for k in r38.backbone.state_dict() if not k.endswith("num_batches_tracked")]
    assert all(mxnet_to_resnet38_name(torch_to_mxnet(k)) == k for k in keys)


def test_save_matches_independent_writer_and_roundtrips(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.array([1, -2, 3], dtype=np.int64)
    path = tmp_path / "x.params"
    save_mxnet_params(path, {"arg:a": a, "aux:b": torch.from_numpy(b)})
    assert path.read_bytes() == mx_file([mx_entry_v2(a, 0), mx_entry_v2(b, 6)],
                                        ["arg:a", "aux:b"])
    for version in ("v1", "v2", "v3", "legacy"):
        save_mxnet_params(path, {"arg:a": a, "aux:b": b}, version=version)
        got = load_mxnet_params(path)
        assert list(got) == ["arg:a", "aux:b"]
        np.testing.assert_array_equal(got["arg:a"], a)
        assert got["aux:b"].dtype == np.int64 and got["aux:b"].tolist() == [1, -2, 3]
    save_mxnet_params(path, {"s": np.float64(2.5), "t": np.ones((2, 3), np.int8).T}, version="v3")
    got = load_mxnet_params(path)  # v3 holds 0-d arrays; non-contiguous input is written in C order
    assert got["s"].shape == () and got["s"] == 2.5 and got["t"].shape == (3, 2)
    with pytest.raises(ValueError, match="0-d"):
        save_mxnet_params(path, {"s": np.float32(1)})


def test_legacy_layout_and_float16(tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 3, 3, 3)).astype(np.float16)
    g = np.linspace(0.5, 1.5, 4096).astype(np.float32)
    u = np.arange(5, dtype=np.uint8)
    path = tmp_path / "legacy.params"
    path.write_bytes(mx_file([mx_entry_legacy(w, 2), mx_entry_legacy(g, 0),
                              mx_entry_v2(u, 3, magic=0xF993FACA)],
                             ["arg:conv1a_weight", "arg:bn7_gamma", "aux:extra"]))
    got = load_mxnet_params(path)
    assert got["arg:conv1a_weight"].dtype == np.float16
    np.testing.assert_array_equal(got["arg:conv1a_weight"], w)
    np.testing.assert_array_equal(got["arg:bn7_gamma"], g)
    np.testing.assert_array_equal(got["aux:extra"], u)
    sd = resnet38_state_dict_from_mxnet(got)
    assert sd["conv1a.weight"].dtype == torch.float16 and sd["bn7.weight"].shape == (4096,)


def test_bad_files_give_clear_errors(tmp_path):
    a = np.ones((2, 2), np.float32)
    good = mx_file([mx_entry_v2(a, 0)], ["arg:a"])
    cases = {
        "magic.params": (b"\x13\x01" + good[2:], "bad magic"),
        "trunc.params": (good[:-10], "truncated"),
        "trunc_data.params": (good[:40], "truncated"),
        "tiny.params": (good[:5], "truncated"),
        "sparse.params": (mx_file([mx_entry_v2(a, 0, stype=1)], ["arg:a"]), "row_sparse"),
        "dtype.params": (mx_file([mx_entry_v2(a, 12)], ["arg:a"]), "dtype flag 12"),
        "noname.params": (mx_file([mx_entry_v2(a, 0)], []), "unnamed"),
        "garbage.params": (struct.pack("<QQQ", 0x112, 0, 1) + b"\xff" * 64, "magic"),
    }
    for fname, (data, msg) in cases.items():
        p = tmp_path / fname
        p.write_bytes(data)
        with pytest.raises(MXNetFormatError, match=msg) as err:
            load_mxnet_params(p)
        assert str(p) in str(err.value), fname
    with pytest.raises(FileNotFoundError):
        load_mxnet_params(tmp_path / "absent.params")


def test_resnet38_full_mxnet_roundtrip(r38, r38_params):
    path = r38_params
    expected = {k: v for k, v in r38.backbone.state_dict().items()
                if not k.endswith("num_batches_tracked")}  # tests that load into r38 restore it
    logs = []
    torch.manual_seed(1)  # a different random init: equality below comes from the file
    m = build_model(cfg(backbone="resnet38", weights=str(path)), C, log=logs.append)
    got = m.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    text = "\n".join(logs)
    assert "WARNING" not in text and "head.weight" in text
    missing, unexpected = load_resnet38_imagenet(m, path, log=quiet)
    assert missing == ["head.weight"] and unexpected == []  # linear1000 dropped
    missing, unexpected = load_resnet38_imagenet(m.backbone, path, log=quiet)
    assert missing == [] and unexpected == []


@pytest.fixture
def r38_restored(r38):
    """The shared ResNet-38, with the blocks these tests overwrite (b3, b3_1) restored after."""
    saved = {k: v.clone() for k, v in r38.state_dict().items() if k.startswith("backbone.b3")}
    yield r38
    r38.load_state_dict(saved, strict=False)


def test_resnet38_subset_shape_mismatch_and_torch_pth(r38_restored, tmp_path):
    r38 = r38_restored
    sd = {k: v.clone() for k, v in r38.backbone.state_dict().items() if k.startswith("b3")}
    subset = {torch_to_mxnet(k): (v + 1).numpy() for k, v in sd.items()
              if k.startswith("b3.") and not k.endswith("num_batches_tracked")}
    subset["arg:linear1000_bias"] = np.zeros(1000, np.float32)
    subset["arg:mystery_weight"] = np.zeros(3, np.float32)
    path = tmp_path / "subset.params"
    save_mxnet_params(path, subset, version="legacy")
    logs = []
    missing, unexpected = load_resnet38_imagenet(r38, path, log=logs.append)
    assert unexpected == ["backbone.mystery_weight"]
    assert "head.weight" in missing and "backbone.b3.conv_branch1.weight" not in missing
    assert "backbone.b4.conv_branch2a.weight" in missing and "backbone.conv1a.weight" in missing
    assert any(line.startswith("WARNING") and "backbone.b4" in line for line in logs)
    assert torch.equal(r38.backbone.b3.conv_branch2a.weight, sd["b3.conv_branch2a.weight"] + 1)
    assert torch.equal(r38.backbone.b3.bn_branch2a.running_var,
                       sd["b3.bn_branch2a.running_var"] + 1)
    assert torch.equal(r38.backbone.b3_1.conv_branch2a.weight, sd["b3_1.conv_branch2a.weight"])

    bad = {"arg:res3a_branch2a_weight": np.zeros((256, 128, 1, 1), np.float32)}
    save_mxnet_params(path, bad)
    with pytest.raises(ValueError, match=r"b3\.conv_branch2a\.weight: file \(256, 128, 1, 1\) "
                                         r"vs model \(256, 128, 3, 3\)"):
        load_resnet38_imagenet(r38, path, log=quiet)

    # the authors' converted torch checkpoint: same names, plus their fc8 head
    pth = tmp_path / "res38_cls.pth"
    new = torch.full_like(sd["b3_1.conv_branch2a.weight"], 0.25)
    torch.save({"state_dict": {"module.b3_1.conv_branch2a.weight": new,
                               "module.fc8.weight": torch.zeros(20, 4096, 1, 1)}}, pth)
    missing, unexpected = load_resnet38_imagenet(r38, pth, log=quiet)
    assert unexpected == ["backbone.fc8.weight"]
    assert torch.equal(r38.backbone.b3_1.conv_branch2a.weight, new)


# ----------------------------------------------------------------------------- torchvision


def test_torchvision_checkpoint_loading(tmp_path):
    torch.manual_seed(3)
    ref = torchvision.models.resnet50(weights=None)
    plain, wrapped = tmp_path / "resnet50.pth", tmp_path / "wrapped.pth"
    torch.save(ref.state_dict(), plain)
    torch.save({"state_dict": ref.state_dict(), "epoch": 90}, wrapped)
    for path in (plain, wrapped):
        logs = []
        m = build_model(cfg(backbone="resnet50", weights=str(path)), C, log=logs.append)
        got, want = m.backbone.state_dict(), ref.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in got)
        assert not any("WARNING" in line for line in logs)
        missing, unexpected = load_torchvision_resnet(m, path, log=quiet)
        assert missing == ["head.weight"] and unexpected == []
    other = tmp_path / "r101.pth"
    torch.save({"model": torchvision.models.resnet101(weights=None).state_dict()}, other)
    logs = []
    missing, unexpected = load_torchvision_resnet(TorchvisionResNet(50, 16), other,
                                                  log=logs.append)
    assert missing == [] and "layer3.22.conv1.weight" in unexpected
    assert any(line.startswith("WARNING") and "layer3.6." in line for line in logs)
    r18 = tmp_path / "r18.pth"  # basic blocks: layer1.0.conv1 is 3x3, not 1x1
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 3, 3\) "
                                         r"vs model \(64, 64, 1, 1\)"):
        load_torchvision_resnet(TorchvisionResNet(50, 16), r18, log=quiet)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("backbone", ["resnet38", "resnet50", "tiny"])
def test_missing_weights_file_names_config_key(backbone, tmp_path):
    path = str(tmp_path / "nope.params")
    with pytest.raises(FileNotFoundError, match="model.weights") as err:
        build_model(cfg(backbone=backbone, weights=path), C, log=quiet)
    assert path in str(err.value)


def test_weights_none_warns_from_scratch():
    logs = []
    build_model(cfg(backbone="resnet50", output_stride=16), C, log=logs.append)
    assert any("WARNING" in line and "from scratch" in line for line in logs)


def test_tiny_weights_roundtrip(tmp_path):
    a = build_model(cfg(backbone="tiny"), C, log=quiet)
    path = tmp_path / "tiny.pth"
    torch.save(a.state_dict(), path)  # a whole EPSNet state dict
    b = build_model(cfg(backbone="tiny", weights=str(path)), C, log=quiet)
    assert all(torch.equal(v, a.backbone.state_dict()[k])
               for k, v in b.backbone.state_dict().items())
