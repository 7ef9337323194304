"""Start-up training for models that ship no checkpoint (the offline demo): seeded, cached like features."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dataloaders import build_dataset
from models import ARCHITECTURES, ModelConfig
from pipeline.features.cache import key_digest
from pipeline.files import write_atomically
from pipeline.config.loading import load_dataset_config

log = logging.getLogger(__name__)


def trained_checkpoint(config: ModelConfig, data_root: Path, cache_dir: Path, device: torch.device) -> Path:
    """Path of the weights `config.train` produces; trains and saves them first unless already cached."""
    recipe = config.train
    dataset = build_dataset(load_dataset_config(recipe.dataset), "train", data_root, config.transform.build())
    key = {"architecture": config.architecture, "num_classes": config.num_classes,
           "recipe": dataclasses.asdict(recipe), "images": dataset.fingerprint(),
           "transform": dataclasses.asdict(config.transform)}
    path = Path(cache_dir) / config.name / f"trained-{key_digest(key)[:16]}.pt"
    if path.is_file():
        log.info("%s: using the weights trained earlier, %s", config.name, path)
        return path

    torch.manual_seed(recipe.seed)
    model, _ = ARCHITECTURES.get(config.architecture)(config.num_classes, config.transform.crop)
    model.to(device).train()
    loader = DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(recipe.seed))
    optimiser = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    for epoch in range(recipe.epochs):
        correct = 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            correct += (logits.argmax(dim=1) == labels).sum().item()
    log.info("%s: trained %d epochs on %d images of %s (last-epoch train accuracy %.1f%%)", config.name,
             recipe.epochs, len(dataset), recipe.dataset, 100 * correct / len(dataset))
    state_dict = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    write_atomically(path, lambda temporary: torch.save(state_dict, temporary))
    return path
