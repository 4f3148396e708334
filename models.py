"""The six CNNs of the study for 1x28x28 input, the MODELS registry, and checkpoints.

    model = build_model("vggnet", num_classes=62)   # model(torch.zeros(8, 1, 28, 28)) -> [8, 62]

Every network keeps its final classifier layer(s) in `self.fc` (transfer_mnist.py replaces it).
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from runs import UserError, atomic_write


def init_weights(model, linear_std=0.01):
    """The study's initialisation: Kaiming-normal convs, N(0, linear_std) linears, BN 1/0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            if linear_std is None:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(module.weight, 0.0, linear_std)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def conv_relu(in_channels, out_channels, **conv_args):
    return [nn.Conv2d(in_channels, out_channels, **conv_args), nn.ReLU(inplace=True)]


class FeaturesClassifier(nn.Module):
    """features -> flatten -> classifier -> fc: the shape LeNet, AlexNet and VGGNet share."""

    def forward(self, x):
        return self.fc(self.classifier(torch.flatten(self.features(x), 1)))


class LeNet(FeaturesClassifier):
    def __init__(self, num_classes=62):
        super().__init__()
        self.features = nn.Sequential(
            *conv_relu(1, 6, kernel_size=5), nn.MaxPool2d(2),
            *conv_relu(6, 16, kernel_size=5), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(3),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(144, 120), nn.BatchNorm1d(120), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(120, 84), nn.BatchNorm1d(84), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(84, num_classes)
        init_weights(self)


class AlexNet(FeaturesClassifier):
    def __init__(self, num_classes=62):
        super().__init__()
        self.features = nn.Sequential(
            *conv_relu(1, 16, kernel_size=3, padding=2), nn.MaxPool2d(3, stride=2),
            *conv_relu(16, 48, kernel_size=3, padding=2), nn.MaxPool2d(3, stride=2),
            *conv_relu(48, 96, kernel_size=3, padding=1),
            *conv_relu(96, 64, kernel_size=3, padding=1),
            *conv_relu(64, 64, kernel_size=3, padding=1), nn.MaxPool2d(3, stride=2),
            nn.AdaptiveAvgPool2d(3),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(576, 1024), nn.BatchNorm1d(1024), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(1024, num_classes)
        init_weights(self)


class VGGNet(FeaturesClassifier):
    def __init__(self, num_classes=62):
        super().__init__()
        layers = []
        # (in, out, pool after): the study's eight 3x3 convs with two max-pools
        for in_channels, out_channels, pool in [
            (1, 16, False), (16, 32, True), (32, 64, False), (64, 64, False),
            (64, 128, False), (128, 128, True), (128, 128, False), (128, 128, False),
        ]:
            layers += conv_relu(in_channels, out_channels, kernel_size=3, padding=1)
            if pool:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(3))
        self.classifier = nn.Sequential(
            nn.Linear(1152, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Dropout(),
        )
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_classes=62):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks, in_channels = [], 16
        for out_channels, stride in [(16, 1), (32, 2), (64, 2), (128, 2)]:
            blocks += [BasicBlock(in_channels, out_channels, stride),
                       BasicBlock(out_channels, out_channels)]
            in_channels = out_channels
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)
        init_weights(self, linear_std=None)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class SpinalNet(nn.Module):
    HALF, WIDTH = 1568, 50  # 64 channels x 7 x 7 = 3136 features, split in two

    def __init__(self, num_classes=62):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(True), nn.MaxPool2d(2),
        )

        def spinal_layer(in_features):
            return nn.Sequential(nn.Linear(in_features, self.WIDTH), nn.ReLU(True), nn.Dropout(0.5))

        self.spinal = nn.ModuleList(
            [spinal_layer(self.HALF)] + [spinal_layer(self.HALF + self.WIDTH) for _ in range(3)]
        )
        self.fc = nn.Linear(4 * self.WIDTH, num_classes)
        init_weights(self)

    def forward(self, x):
        features = torch.flatten(self.features(x), 1)
        halves = features[:, : self.HALF], features[:, self.HALF :]
        outputs = [self.spinal[0](halves[0])]
        for i in range(1, 4):  # layers alternate halves, each also sees the previous output
            outputs.append(self.spinal[i](torch.cat([halves[i % 2], outputs[-1]], dim=1)))
        return self.fc(torch.cat(outputs, dim=1))


class EnsNet(nn.Module):
    SLICE, HEADS = 1800, 10  # 2000 channels x 3 x 3 = 18000 features = 10 slices of 1800

    def __init__(self, num_classes=62):
        super().__init__()

        def block(in_channels, out_channels, padding):
            return [nn.Conv2d(in_channels, out_channels, 3, padding=padding),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True), nn.Dropout(0.35)]

        self.features = nn.Sequential(
            *block(1, 64, 1), *block(64, 128, 0), *block(128, 256, 1), nn.MaxPool2d(2),
            *block(256, 512, 1), *block(512, 1024, 0), *block(1024, 2000, 1), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(3),
        )
        # fc[0] is the major classifier on the first slice; fc[1:] are the ten sub-network heads
        self.fc = nn.ModuleList(nn.Linear(self.SLICE, num_classes) for _ in range(self.HEADS + 1))
        self.head_weights = nn.Parameter(torch.full((self.HEADS + 1,), 1.0 / (self.HEADS + 1)))
        init_weights(self)

    def forward(self, x):
        features = torch.flatten(self.features(x), 1)
        slices = [features[:, : self.SLICE]] + list(features.split(self.SLICE, dim=1))
        logits = torch.stack([head(part) for head, part in zip(self.fc, slices)])
        return torch.einsum("h,hbc->bc", self.head_weights, logits)


MODELS = {"lenet": LeNet, "alexnet": AlexNet, "vggnet": VGGNet, "resnet": ResNet,
          "spinalnet": SpinalNet, "ensnet": EnsNet}


def build_model(name, num_classes=62):
    return MODELS[name](num_classes=num_classes)


# ----------------------------------------------------------------------------- checkpoints
# One file per stage run (torch.save; loads with weights_only=True): model, num_classes, dataset,
# classes, mean, std, state_dict (the kept epoch); a training run's also args, history and last
# (the last epoch's state_dict and optimizer state, which --resume continues).

def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda partial: torch.save(checkpoint, partial))


def load_checkpoint(path, model_name=None):
    """(checkpoint, its network on the CPU); a missing or foreign file: one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one (train.py) or give --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(ckpt["model"], ckpt["num_classes"])
        model.load_state_dict(ckpt["state_dict"])
        ckpt.update(classes=list(ckpt["classes"]), mean=float(ckpt["mean"]), std=float(ckpt["std"]))
    except Exception as err:  # not a zip, a pickle, another project's dict: all foreign here
        kind = type(err).__name__
        raise UserError(f"{path} is not a checkpoint of this project ({kind})") from None
    if model_name is not None and ckpt["model"] != model_name:
        raise UserError(f"{path} holds {ckpt['model']}, not {model_name}: give that --model")
    return ckpt, model
