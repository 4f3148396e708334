"""The study's original input pipeline and loop, kept only to measure ours against: PIL images,
per-sample torchvision RandomAffine + ToTensor + Normalize, a DataLoader with worker processes."""
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import AUGMENT  # noqa: E402


class PILDataset(Dataset):
    def __init__(self, images, labels, mean, std, augment=True):
        self.images = [Image.fromarray(image.numpy(), mode="L") for image in images]
        self.labels = labels.tolist()
        steps = [transforms.RandomAffine(degrees=AUGMENT["degrees"], translate=(AUGMENT["translate"],) * 2,
                                         scale=AUGMENT["scale"], shear=AUGMENT["shear"])] if augment else []
        self.transform = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize((mean,), (std,))])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(self.images[index]), self.labels[index]


def original_loader(images, labels, mean, std, batch_size=64, workers=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(PILDataset(images, labels, mean, std), batch_size=batch_size, shuffle=True,
                      num_workers=workers, drop_last=True, generator=generator,
                      persistent_workers=workers > 0)


def study_epoch(model, optimizer, loader, device, clip, max_batches=None):
    """The study's loop over its DataLoader: per batch, a host-to-device copy, fp32 forward and backward,
    clipping and a step. Images trained on."""
    model.train()
    seen = 0
    for step, (inputs, target) in enumerate(loader):
        if max_batches is not None and step >= max_batches:
            break
        loss = torch.nn.functional.cross_entropy(model(inputs.to(device)), target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        seen += len(target)
    return seen


if __name__ == "__main__":
    sys.exit("original_pipeline.py is what throughput.py and time_to_accuracy.py measure ours against: "
             "run python benchmarks/throughput.py --help")
