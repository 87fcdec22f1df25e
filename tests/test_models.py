"""The model zoo: built-in models from the registry, torchvision models by name, a
user's factory through ``model._target_``, and the authors' CIFAR ResNets."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dist_ast.cli import compose_config
from dist_ast.config import ConfigError, ModelConfig, RunConfig, config_as_dict, to_run_config
from dist_ast.models import BUILTIN_MODELS, build_model, build_subnet_model, dense_layer_names
from dist_ast.sparsity.layers import SubnetConv2d, SubnetLinear, SwitchableBatchNorm2d
from dist_ast.sparsity.model import SubnetModel
from dist_ast.subnets_io import load_subnet_model
from dist_ast.train import run

# ---------------------------------------------------------------- the authors' CIFAR ResNets


def cifar_resnet_params(n: int, classes: int = 10, option_b: bool = True) -> int:
    """Parameters of ResNet-(6n+2) counted from the architecture: a 3x3 stem conv 3->16
    with BN, three stages of n basic blocks (two 3x3 convs + two BNs each) at 16/32/64
    channels, a 1x1 conv + BN shortcut into stages 2 and 3 (option B; option A's
    zero-padding shortcut has no parameters), and a 64 -> classes linear layer."""
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(3, 16, 3) + bn(16)
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, width, 3) + conv(width, width, 3) + 2 * bn(width)
            if cin != width and option_b:
                total += conv(cin, width, 1) + bn(width)
            cin = width
    return total + 64 * classes + classes


# He et al. (2016), Table 6: 0.27M / 0.46M / 0.85M parameters (option A shortcuts), the
# exact counts of the common PyTorch reimplementations.
HE_ET_AL_OPTION_A = {"resnet20": 269_722, "resnet32": 464_154, "resnet56": 853_018}


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet32", 5), ("resnet56", 9)])
def test_cifar_resnet_parameter_count(name: str, n: int) -> None:
    net = build_model(ModelConfig(name=name))
    count = sum(p.numel() for p in net.parameters())
    assert count == cifar_resnet_params(n)
    assert cifar_resnet_params(n, option_b=False) == HE_ET_AL_OPTION_A[name]
    # option B adds exactly the two 1x1 shortcut convs and their BNs
    assert count - HE_ET_AL_OPTION_A[name] == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert count == {"resnet20": 272_474, "resnet32": 466_906, "resnet56": 855_770}[name]


def test_resnet20_layout_as_the_authors() -> None:
    """Dense stem, sparse classifier, 1x1 shortcuts only where the shape changes, every
    BatchNorm switchable; 32x32 in, logits out, 8x8 before the pooling."""
    model = build_subnet_model(ModelConfig(name="resnet20"), 3)
    net = model.net
    assert type(net.conv1) is nn.Conv2d and net.conv1.out_channels == 16
    assert isinstance(net.fc, SubnetLinear) and net.fc.in_features == 64
    assert [len(getattr(net, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    shortcuts = [
        n for n, m in net.named_modules() if isinstance(m, SubnetConv2d) and "shortcut" in n
    ]
    assert shortcuts == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    assert len(model.sparse_names) == 2 * 9 + 2 + 1  # 18 block convs, 2 shortcuts, fc
    assert not [m for m in net.modules() if type(m) is nn.BatchNorm2d]
    shapes = []
    net.layer3.register_forward_hook(lambda m, i, o: shapes.append(o.shape) and None)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert shapes == [(2, 64, 8, 8)]


# ---------------------------------------------------------------- registry and dense layers


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_every_builtin_is_a_config_group_option(name: str) -> None:
    assert compose_config([f"model={name}"]).model.name == name


@pytest.mark.parametrize("name", ["tiny_cnn", "wrn32", "resnet18", "resnet50", "resnet20"])
def test_builtin_dense_layers_are_conv1_and_fc(name: str) -> None:
    """The generic rule (first and last Conv2d/Linear) names what the if-chain named."""
    net = build_model(ModelConfig(name=name, small_input=name == "resnet18"))
    assert dense_layer_names(net, dense_classifier=False) == ["conv1"]
    assert dense_layer_names(net, dense_classifier=True) == ["conv1", "fc"]


def test_small_input_and_zero_init_residual() -> None:
    """``model=resnet18`` (config group) and ModelConfig(name="resnet18") build the same
    ImageNet stem; the CIFAR stem is asked for."""
    assert compose_config(["model=resnet18"]).model.small_input is False
    assert ModelConfig(name="resnet18").small_input is False
    net = build_model(ModelConfig(name="resnet18", small_input=True))
    assert net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, nn.Identity)
    # any torchvision ResNet takes the CIFAR stem; a model without that stem refuses it
    assert build_model(ModelConfig(name="resnet34", small_input=True)).conv1.stride == (1, 1)
    with pytest.raises(ConfigError, match="model.small_input"):
        build_model(ModelConfig(name="mobilenet_v3_small", small_input=True))
    # torchvision's other models take **kwargs and would ignore zero_init_residual
    with pytest.raises(ConfigError, match="model.zero_init_residual"):
        build_model(ModelConfig(name="mobilenet_v3_small", zero_init_residual=True))
    net = build_model(ModelConfig(name="resnet18", zero_init_residual=True))
    assert not net.layer1[0].bn2.weight.any()


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.name=vgg"], "model.name"),
        (["model.name=tests.model_factories.small_net"], "model._target_=tests"),  # the hint
        (["model._target_=tests.model_factories.missing"], "model._target_"),
        (["model._target_=no_such_package_xyz.net"], "model._target_"),
        (["model._target_=small_net"], "model._target_"),
        (["model._target_=tests.model_factories.no_num_classes"], "model._target_"),
        (["model._target_=tests.model_factories.NOT_CALLABLE"], "model._target_"),
    ],
)
def test_unknown_models_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        compose_config(["experiment=demo", *overrides])
    assert "\n" not in str(e.value)


def test_a_model_with_no_sparse_layer_is_a_one_line_config_error() -> None:
    cfg = compose_config(["model._target_=tests.model_factories.linear_probe"])
    with pytest.raises(ConfigError) as e:
        build_subnet_model(cfg.model, 3)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("invalid model._target_='tests.model_factories.linear_probe'")
    assert "no nn.Conv2d/nn.Linear layer to make sparse" in msg


def test_target_labels_the_run_and_round_trips() -> None:
    """With ``_target_`` the name is the target (summary, checkpoint checks); a saved
    config.json validates back to the same config."""
    cfg = compose_config(["model._target_=tests.model_factories.small_net"])
    assert cfg.model.name == cfg.model._target_ == "tests.model_factories.small_net"
    assert to_run_config(config_as_dict(cfg)) == cfg


# ---------------------------------------------------------------- two training steps

SHORT = [
    "experiment=demo",
    "train.stop_after_steps=2",
    "train.batch_size=8",
    "train.log_every=1",
    "train.final_eval=false",
    "train.progress=false",
    "train.tensorboard=false",
    "ast.initial_sparsity=0.5",  # half of each sparse layer outside the masks: frozen
]


def train_two_steps(tmp_path, *overrides: str) -> dict:
    summary = run(compose_config([*SHORT, f"run_dir={tmp_path}", *overrides]))
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    return summary


def trained_weights_moved(tmp_path, before: SubnetModel) -> tuple[RunConfig, SubnetModel]:
    """The saved sub-nets load back (model from config.json); in every sparse layer the
    two trained sub-nets' weights moved and the weights in neither mask kept their init
    (``before``: the same seed, built as the trainer builds it)."""
    config, model = load_subnet_model(tmp_path)
    for w, w0, mask0, mask1 in zip(
        model.sparse_weights(), before.sparse_weights(), model.masks(0), model.masks(1), strict=True
    ):
        trained = mask0 | mask1
        assert 0 < int(trained.sum()) < trained.numel()
        assert not torch.equal(w[trained], w0[trained])
        assert torch.equal(w[~trained], w0[~trained])
    return config, model


def test_torchvision_model_by_name_trains(tmp_path) -> None:
    torch.manual_seed(0)  # the trainer seeds with train.seed=0 before building
    before = build_subnet_model(ModelConfig(name="mobilenet_v3_small"), 3)
    train_two_steps(tmp_path, "model.name=mobilenet_v3_small")
    config, model = trained_weights_moved(tmp_path, before)
    assert config.model.name == "mobilenet_v3_small"
    assert type(model.net.features[0][0]) is nn.Conv2d  # the stem stays dense
    assert isinstance(model.net.classifier[3], SubnetLinear)  # the classifier is sparse
    assert len(model.sparse_names) > 40
    assert all(type(m) is not nn.BatchNorm2d for m in model.modules())
    assert any(isinstance(m, SwitchableBatchNorm2d) for m in model.modules())


def test_target_factory_trains(tmp_path) -> None:
    torch.manual_seed(0)
    before = build_subnet_model(ModelConfig(_target_="tests.model_factories.small_net"), 3)
    summary = train_two_steps(tmp_path, "model._target_=tests.model_factories.small_net")
    config, model = trained_weights_moved(tmp_path, before)
    assert config.model._target_ == "tests.model_factories.small_net"
    assert model.sparse_names == ["body.2", "body.5", "head"]  # stem dense
    assert [s["target_sparsity"] for s in summary["subnets"]] == [0.5, 0.8, 0.9]
