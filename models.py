"""The six CNNs of the study, for 1x28x28 input, and the MODELS registry.

    from models import build_model
    model = build_model("vggnet", num_classes=62)
    logits = model(torch.zeros(8, 1, 28, 28))   # -> [8, 62]

Every network keeps its final classifier layer(s) in `self.fc`, so that
`replace_head()` can give it a new number of classes (transfer to MNIST).
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from runs import UserError, atomic_path, is_int, is_number


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
            blocks += [BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels)]
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
            nn.Conv2d(1, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )

        def spinal_layer(in_features):
            return nn.Sequential(nn.Linear(in_features, self.WIDTH), nn.ReLU(inplace=True), nn.Dropout(0.5))

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
            return [nn.Conv2d(in_channels, out_channels, 3, padding=padding), nn.BatchNorm2d(out_channels),
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


MODELS = {
    "lenet": LeNet,
    "alexnet": AlexNet,
    "vggnet": VGGNet,
    "resnet": ResNet,
    "spinalnet": SpinalNet,
    "ensnet": EnsNet,
}


def build_model(name, num_classes=62):
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def new_head(old, num_classes, keep_rows=None):
    """A fresh Linear like `old` with `num_classes` outputs, copying `old`'s rows `keep_rows` if given."""
    head = nn.Linear(old.in_features, num_classes).to(old.weight.device)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    if keep_rows is not None:
        with torch.no_grad():
            head.weight.copy_(old.weight[keep_rows])
            head.bias.copy_(old.bias[keep_rows])
    return head


def replace_head(model, num_classes, keep_rows=None):
    """Give `model` a new classifier for `num_classes` classes (e.g. EMNIST -> MNIST)."""
    if isinstance(model.fc, nn.ModuleList):  # EnsNet's eleven heads
        model.fc = nn.ModuleList(new_head(head, num_classes, keep_rows) for head in model.fc)
    else:
        model.fc = new_head(model.fc, num_classes, keep_rows)
    return model


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_KEYS = ("model", "num_classes", "dataset", "classes", "mean", "std", "state_dict")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: the message says which and what to do."""


def unwrap(model):
    """The plain nn.Module under DistributedDataParallel and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def forward(model, inputs, precision):
    """The network's logits under a run's precision (runs.Precision): the one forward pass of training,
    evaluation and prediction."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=precision.bf16):
        return model(inputs)


def save_checkpoint(path, model, optimizer=None, /, **fields):
    """Write atomically (unique temporary file, then rename): a crash never leaves a broken checkpoint."""
    state = {**fields, "state_dict": unwrap(model).state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    with atomic_path(path) as partial:
        torch.save(state, partial)


def read_checkpoint(path, hint):
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a file: give the path of a checkpoint (.pth)")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle, random bytes: all mean the same to the user
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}): it is corrupt, "
                              f"truncated or not of this project; delete it and train again") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this project (it lacks {', '.join(missing)})")
    return state


NORMALISATION_STD_MIN = 1e-3  # a smaller pixel std means a blank dataset, or a damaged checkpoint


def check_fields(state, path, datasets):
    """The plain fields a checkpoint must hold for any script to use it."""
    if not isinstance(state["model"], str) or state["model"] not in MODELS:
        raise CheckpointError(f"{path} names an unknown network {state['model']!r} "
                              f"(known: {', '.join(sorted(MODELS))})")
    if not isinstance(state["dataset"], str) or (datasets is not None and state["dataset"] not in datasets):
        raise CheckpointError(f"{path} names an unknown dataset {state['dataset']!r} "
                              f"(known: {', '.join(sorted(datasets or []))})")
    classes = state["classes"]
    if not is_int(state["num_classes"]) or not isinstance(classes, (list, tuple, str)) or \
            len(classes) != state["num_classes"] or not all(isinstance(label, str) and label for label in classes):
        raise CheckpointError(f"{path} has {state['num_classes']!r} classes but a class list of another length or "
                              f"with labels that are not names: it is damaged or was edited; train it again")
    for key, low in (("mean", 0.0), ("std", NORMALISATION_STD_MIN)):  # of pixels scaled to [0, 1]
        value = state[key]
        if not is_number(value) or not math.isfinite(value) or not low <= value <= 1:
            raise CheckpointError(f"{path} has an unusable normalisation {key} = {value!r} (pixels in [0, 1] "
                                  f"have a {key} from {low:g} to 1): it is damaged or was edited; train it again")


def training_args(state):
    """The settings a checkpoint was trained with ({} when it holds none, or something else)."""
    return state["args"] if isinstance(state.get("args"), dict) else {}


# The networks fine-tuned on EMNIST ByClass, committed with the repository (results/emnist-byclass/README.md): what
# hubconf.py serves, and `evaluate.py --image` and demo.py when the hub holds none of their own. Searched in order:
# the recipe chosen on validation's where committed (its pre-training validated better than the study's for every
# network), else the study's recipe's.
BYCLASS = Path(__file__).resolve().parent / "results" / "emnist-byclass"
PUBLISHED_HUBS = (BYCLASS / "chosen-on-validation" / "model_hub", BYCLASS / "study" / "model_hub")


def published_checkpoint(name):
    """The published ByClass checkpoint of network `name`, or None when the repository holds none."""
    paths = (hub / "fine_tuned" / f"{name}_tuned.pth" for hub in PUBLISHED_HUBS)
    return next((path for path in paths if path.is_file()), None)


def load_checkpoint(path, model_name=None, hint="make one with `python train.py --model MODEL` or pass --ckpt PATH",
                    datasets=None):
    """(state, model on the CPU) from a checkpoint read with weights_only=True; one-line errors.

    The network, classes and normalisation come from the checkpoint; `model_name`, when
    given, is only checked against it, and so is the dataset against `datasets` (the names known).
    """
    state = read_checkpoint(path, hint)
    check_fields(state, path, datasets)
    if model_name is not None and state["model"] != model_name:
        raise CheckpointError(f"{path} holds a {state['model']} checkpoint, not {model_name}: "
                              f"pass --model {state['model']} (or leave --model out) or another --ckpt")
    model = build_model(state["model"], state["num_classes"])
    try:
        model.load_state_dict(state["state_dict"])
    except (RuntimeError, TypeError, AttributeError):
        raise CheckpointError(f"{path} says {state['model']} with {state['num_classes']} classes but holds the "
                              f"weights of another architecture: it is damaged or was edited; train it again") \
            from None
    if not all(torch.isfinite(tensor).all() for tensor in model.state_dict().values() if tensor.is_floating_point()):
        raise CheckpointError(f"{path} holds NaN or infinite weights: it comes from a diverged run; train again "
                              f"with a lower learning rate")
    return state, model
