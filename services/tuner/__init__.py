"""llmos.services.tuner: LoRA fine-tuning jobs (the ``tuner`` service) and the library under them.

Entry points: ``load_jsonl`` / ``Dataset`` (validated, cleaned, de-duplicated, split data),
``TrainParams`` / ``TrainError``, and ``train_lora`` (a cancellable, resumable peft LoRA loop).
``train_lora`` is imported on first use: torch and peft load only when something trains, so the
service starts light.
"""
from llmos.services.tuner.dataset import Dataset, DatasetError, Record, load_jsonl
from llmos.services.tuner.params import TrainError, TrainParams

__all__ = ["Dataset", "DatasetError", "Record", "TrainError", "TrainParams", "load_jsonl",
           "train_lora"]


def __getattr__(name: str):
    if name == "train_lora":
        from llmos.services.tuner.train import train_lora
        return train_lora
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
