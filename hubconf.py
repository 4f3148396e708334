"""torch.hub entry points: the networks of the EMNIST ByClass study, with their published weights.

    model = torch.hub.load(".", "resnet", source="local", pretrained=True)   # in a clone
    model.classes, model.mean, model.std   # "0-9A-Za-z", and the normalisation of its inputs

The weights are results/emnist-byclass/published/{name}.pth (its README says how they were trained).
They were trained on 96,323 images of EMNIST ByClass's official *test* split (the only complete
ByClass split at hand; its other 20,000 images tested them): scored on the whole official test
split, they measure mostly training accuracy, not test accuracy.
A network takes [N, 1, 28, 28] upright images in [0, 1], normalised as (x - mean) / std;
evaluate.prepare_picture turns a photo or a drawing into one.
"""
dependencies = ["torch"]


def _network(name, pretrained):
    from data import DATASETS
    from evaluate import published_checkpoint
    from models import build_model, load_checkpoint

    if not pretrained:
        model = build_model(name, 62)
        classes = "".join(DATASETS["emnist-byclass"].classes)
        model.classes, model.mean, model.std = classes, None, None
        return model
    if published_checkpoint(name) is None:
        raise RuntimeError(f"this copy holds no published {name} weights: pass pretrained=False")
    ckpt, model = load_checkpoint(published_checkpoint(name), name)
    model.classes, model.mean, model.std = "".join(ckpt["classes"]), ckpt["mean"], ckpt["std"]
    return model.eval()


def lenet(pretrained=True):
    """LeNet, trained on 96,323 images of the official ByClass *test* split."""
    return _network("lenet", pretrained)


def alexnet(pretrained=True):
    """AlexNet, trained on 96,323 images of the official ByClass *test* split."""
    return _network("alexnet", pretrained)


def vggnet(pretrained=True):
    """VGGNet, trained on 96,323 images of the official ByClass *test* split."""
    return _network("vggnet", pretrained)


def resnet(pretrained=True):
    """ResNet, trained on 96,323 images of the official ByClass *test* split."""
    return _network("resnet", pretrained)


def spinalnet(pretrained=True):
    """SpinalNet, trained on 96,323 images of the official ByClass *test* split."""
    return _network("spinalnet", pretrained)
