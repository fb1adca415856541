"""Training parameters and refusals: checked by the tuner service without loading torch."""
from __future__ import annotations

from dataclasses import dataclass

from llmos.syscalls.errors import SyscallError

METRICS_FILE = "metrics.json"        # beside a published adapter


class TrainError(SyscallError):
    """A refused training call (bad params, bad checkpoint...). ``.errno`` is the ABI name."""


@dataclass
class TrainParams:
    """Hyperparameters, validated on creation. ``target_modules=None`` means every attention
    projection the model has; a list names module suffixes; ``"all-linear"`` is peft's."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 4
    max_steps: int | None = None
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_tokens: int = 1024           # per record; longer ones are cut from the right
    checkpoint_every: int = 0        # steps; 0 = only on cancel
    checkpoint_dir: str | None = None
    keep_checkpoint: bool = False    # leave a checkpoint at the end, to train further later

    def __post_init__(self):
        def bad(why: str):
            raise TrainError("EINVAL", why)
        if not isinstance(self.rank, int) or self.rank <= 0:
            bad(f"rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            bad(f"lr must be positive, got {self.lr!r}")
        for name in ("epochs", "batch_size", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                bad(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            bad(f"max_steps must be a positive integer or None, got {self.max_steps!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            bad(f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}")

    @classmethod
    def from_dict(cls, params: dict) -> "TrainParams":
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise TrainError("EINVAL", f"unknown training params: {', '.join(sorted(unknown))}")
        return cls(**params)
