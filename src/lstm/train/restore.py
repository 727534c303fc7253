"""A trained model back from a checkpoint, for `evaluate`, `predict` and `generate`."""

from __future__ import annotations

from . import TrainError, checkpoint
from .models import architecture
from .tasks import get


def restore(path):
    """(task, model in eval mode, hp, checkpoint folder) from a run folder or a checkpoint folder."""
    folder = checkpoint.resolve(path)
    config = checkpoint.read_config(folder)
    if not isinstance(config, dict) or not {"task", "hp", "meta"} <= set(config):
        raise TrainError(f"checkpoint {folder}: config.json is not an `lstm train` config")
    task = get(config["task"])
    try:
        model = task.model(config["hp"], config["meta"])
    except (KeyError, TypeError) as error:
        raise TrainError(f"checkpoint {folder}: config.json lacks what the {task.name} model needs ({error})") from None
    if config.get("architecture") not in (None, architecture(model)):
        raise TrainError(f"checkpoint {folder}: of another architecture than this version builds for {task.name}")
    checkpoint.load_weights(folder, model)
    model.eval()
    return task, model, config["hp"], folder
