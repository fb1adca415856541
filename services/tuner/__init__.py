"""llmos.services.tuner: LoRA fine-tuning as a library (the tuner service will wrap it).

Entry points: ``load_jsonl`` / ``Dataset`` (validated, cleaned, de-duplicated, split data),
``train_lora`` (a cancellable, resumable peft LoRA loop), and their errors.
"""
from llmos.services.tuner.dataset import Dataset, DatasetError, Record, load_jsonl
from llmos.services.tuner.train import TrainError, TrainParams, train_lora

__all__ = ["Dataset", "DatasetError", "Record", "TrainError", "TrainParams", "load_jsonl",
           "train_lora"]
