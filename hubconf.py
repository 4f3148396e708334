"""torch.hub entry points: the networks of the EMNIST ByClass study, with their trained weights.

    model = torch.hub.load("OWNER/REPO", "resnet", pretrained=True)       # or source="local" on a clone
    model.classes, model.mean, model.std   # "0-9A-Za-z", and the normalisation of its inputs

Each network was fine-tuned on 96,323 images of the official ByClass test split
(results/emnist-byclass/README.md): VGGNet by the recipe chosen on validation, the others by the
study's recipe (models.published_checkpoint). It takes [N, 1, 28, 28] upright images scaled to
[0, 1] and normalised with (x - mean) / std; evaluate.prepare_user_image prepares a picture.
"""
dependencies = ["torch"]


def _network(name, pretrained):
    from data import CLASSES
    from models import PUBLISHED_HUBS, CheckpointError, build_model, load_checkpoint, published_checkpoint

    if not pretrained:
        model = build_model(name, len(CLASSES["emnist-byclass"]))
        model.classes, model.mean, model.std = "".join(CLASSES["emnist-byclass"]), None, None
        return model
    path = published_checkpoint(name)
    if path is None:
        raise CheckpointError(f"this copy holds no published {name} weights (fine_tuned/{name}_tuned.pth in "
                              f"{' or '.join(map(str, PUBLISHED_HUBS))}): pass pretrained=False for a fresh network")
    state, model = load_checkpoint(path, name)
    model.classes, model.mean, model.std = "".join(state["classes"]), state["mean"], state["std"]
    return model.eval()


def lenet(pretrained=True):
    """LeNet, trained on EMNIST ByClass (62 classes)."""
    return _network("lenet", pretrained)


def alexnet(pretrained=True):
    """AlexNet, trained on EMNIST ByClass (62 classes)."""
    return _network("alexnet", pretrained)


def vggnet(pretrained=True):
    """VGGNet, trained on EMNIST ByClass (62 classes)."""
    return _network("vggnet", pretrained)


def resnet(pretrained=True):
    """ResNet, trained on EMNIST ByClass (62 classes)."""
    return _network("resnet", pretrained)


def spinalnet(pretrained=True):
    """SpinalNet, trained on EMNIST ByClass (62 classes)."""
    return _network("spinalnet", pretrained)
