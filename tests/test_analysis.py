"""Fig. 7's measurement: the std of each 3x3 layer's response after BN, before ReLU/addition."""

import pytest
import torch

from annotated_resnet import cifar_resnet, create_model
from annotated_resnet.analysis import layer_response_std, three_by_three_responses


@pytest.mark.parametrize("depth", [20, 56])
def test_one_response_per_3x3_layer_in_forward_order(depth):
    names = [name for name, _ in three_by_three_responses(create_model(f"resnet{depth}"))]
    assert len(names) == depth - 1                       # 6n+1 3x3 layers, the fc is not one
    assert names[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    assert names[-1] == f"layer3.{(depth - 2) // 6 - 1}.bn2"


def test_bottleneck_nets_count_only_their_3x3_layers():
    assert len(three_by_three_responses(create_model("resnet50"))) == 16   # 7x7 stem, 1x1 convs excluded


def test_std_equals_a_direct_computation_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = cifar_resnet(8).train()
    images = torch.randn(40, 3, 32, 32)
    stds = layer_response_std(model, images, batch_size=16)
    assert model.training and all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        model.eval()
        stem = model.bn1(model.conv1(images))
        first_block = model.layer1[0].bn1(model.layer1[0].conv1(torch.relu(stem)))
    assert stds[0] == pytest.approx(stem.std(unbiased=False).item(), rel=1e-5)
    assert stds[1] == pytest.approx(first_block.std(unbiased=False).item(), rel=1e-5)


def test_a_residual_function_at_zero_has_zero_response():
    model = create_model("resnet20", zero_init_residual=True)    # every block's last BN scale is 0
    stds = dict(zip([n for n, _ in three_by_three_responses(model)],
                    layer_response_std(model, torch.randn(8, 3, 32, 32))))
    assert all(std == 0 for name, std in stds.items() if name.endswith("bn2"))
    assert all(std > 0 for name, std in stds.items() if not name.endswith("bn2"))


def test_rejects_unnormalized_images_and_other_models():
    with pytest.raises(ValueError, match="normalize"):
        layer_response_std(create_model("resnet20"), torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="annotated_resnet.ResNet"):
        three_by_three_responses(torch.nn.Linear(2, 2))
