import re

import pytest

from runs import UserError
import torch
import torch.nn.functional as F

from conftest import ROOT
from models import MODELS, build_model, count_parameters, replace_head


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_classes", [62, 10])
def test_output_shape_train_and_eval(name, num_classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes)
    images = torch.randn(3, 1, 28, 28)
    model.train()
    assert model(images).shape == (3, num_classes)
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(UserError) as error:
        build_model("googlenet")
    for name in MODELS:
        assert name in str(error.value)


def test_readme_parameter_counts_match_the_code():
    readme = (ROOT / "README.md").read_text()
    for name in MODELS:
        match = re.search(rf"^\| {name} \| ([\d,]+) \|", readme, re.MULTILINE)
        assert match, f"README has no parameter-count row for {name}"
        assert int(match.group(1).replace(",", "")) == count_parameters(build_model(name, 62))


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name == "ensnet" else name
                                  for name in sorted(MODELS)])
def test_a_few_sgd_steps_lower_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    model.train()
    images = torch.randn(10, 1, 28, 28)
    labels = torch.arange(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # dropout makes single steps noisy: compare the loss in eval mode before and after
    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = F.cross_entropy(model(images), labels).item()
        model.train()
        return loss

    before = eval_loss()
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        assert torch.isfinite(loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    after = eval_loss()
    assert after < before, f"{name}: loss {before:.4f} -> {after:.4f}"


def test_study_initialisation():
    model = build_model("lenet")
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert model.fc.bias.abs().sum() == 0
    conv = model.features[0]
    # kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * k * k))
    assert conv.weight.std().item() == pytest.approx((2 / (6 * 25)) ** 0.5, rel=0.25)
    ensnet = build_model("ensnet")
    assert torch.allclose(ensnet.head_weights, torch.full((11,), 1 / 11))


@pytest.mark.parametrize("name", ["lenet", "ensnet"])
def test_replace_head_keeps_the_chosen_rows(name):
    torch.manual_seed(0)
    model = build_model(name, 62).eval()
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        digit_logits = model(images)[:, :10]
        replace_head(model, 10, keep_rows=list(range(10)))
        assert torch.allclose(model(images), digit_logits, atol=1e-5)
        replace_head(model, 7)
        assert model(images).shape == (4, 7)
