"""LoRA fine-tuning of a causal LM: a small, cancellable, resumable torch loop over peft.

``train_lora`` is the whole contract. It promises:

* ``out_dir`` appears complete or not at all: the adapter (peft ``save_pretrained``, so peft
  and ``llmos.drivers.lora`` load it) and ``metrics.json`` are written to a temporary sibling
  and renamed into place at the end. An existing ``out_dir`` is refused (``EEXIST``).
* Loss is taken only on what the model should learn to write: the completion (plus EOS) of a
  prompt/completion record, the last assistant message of a chat record.
* ``should_stop()`` is polled before every step; when it says so the loop stops, saves a
  checkpoint and returns ``state="cancelled"`` with no ``out_dir``.
* Every ``checkpoint_every`` steps the adapter weights, optimizer state and step are saved
  (atomically) to ``checkpoint_dir`` (default ``<out_dir>.ckpt`` beside ``out_dir``); a later
  call with the same ``out_dir`` resumes from there, keeping the step count. The checkpoint is
  removed once the final adapter is in place.

Not reproduced on resume: the dropout RNG stream (batch order is reproduced exactly).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmos.services.tuner.dataset import Record
from llmos.services.tuner.params import METRICS_FILE, TrainError, TrainParams  # noqa: F401 (re-exported)

IGNORE = -100           # label value the loss skips
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj",     # llama family
                         "c_attn", "c_proj",                         # gpt2 (c_proj: also MLP)
                         "query_key_value", "dense", "Wqkv", "out_proj")
_CKPT_STATE, _CKPT_WEIGHTS, _CKPT_OPTIM = "state.json", "adapter.safetensors", "optimizer.pt"


@dataclass
class Example:
    """One tokenized record: ``labels`` is ``input_ids`` with IGNORE where no loss is taken."""
    input_ids: list[int]
    labels: list[int] = field(default_factory=list)


# ---- tokenization ---------------------------------------------------------------------------

def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def split_record(tokenizer, record: Record) -> tuple[str, str, bool]:
    """``(prompt_text, target_text, prompt_has_specials)``: what the model reads, what it must
    write. The prompt is exactly what generation would be given, so training matches use."""
    if not record.is_chat:
        return record.prompt, record.completion, False
    msgs = [{"role": r, "content": c} for r, c in record.messages]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    prompt = _render_chat(tokenizer, msgs[:last], add_generation_prompt=True)
    full = _render_chat(tokenizer, msgs[:last + 1], add_generation_prompt=False)
    if full.startswith(prompt):         # the template's own end-of-turn marker is learned too
        return prompt, full[len(prompt):], True
    return prompt, msgs[last]["content"], True


def encode(tokenizer, record: Record, max_tokens: int) -> Example:
    """Tokenize prompt and target separately (as generation will see the prompt) and join;
    a prompt/completion target ends with EOS so the model learns to stop."""
    prompt, target, templated = split_record(tokenizer, record)
    prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not record.is_chat and tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_tokens]
    labels = ([IGNORE] * len(prompt_ids) + target_ids)[:max_tokens]
    return Example(ids, labels)


def _batches(examples: list[Example], order: list[int], batch_size: int, pad_id: int):
    """Right-padded tensors (input_ids, attention_mask, labels) in ``order``."""
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(e.labels)
        yield ids, mask, labels


def _epoch_order(num: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


# ---- model ----------------------------------------------------------------------------------

def default_target_modules(model: torch.nn.Module) -> list[str]:
    """The attention projections ``model`` actually has (by module-name suffix)."""
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    found = [p for p in ATTENTION_PROJECTIONS if p in present]
    if "c_attn" in found:               # gpt2: c_proj is in both attention and MLP; keep attn
        found = ["c_attn"]
    if not found:
        raise TrainError("EINVAL", "no attention projections found; pass target_modules")
    return found


def _evaluate(model, examples: list[Example], batch_size: int, pad_id: int, device) -> float:
    """Mean loss per target token over ``examples`` (nan when there are none)."""
    if not examples:
        return math.nan
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, labels in _batches(examples, list(range(len(examples))), batch_size, pad_id):
            n = int((labels[:, 1:] != IGNORE).sum())
            if n == 0:
                continue
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        labels=labels.to(device))
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    return total / count if count else math.nan


# ---- checkpoints ----------------------------------------------------------------------------

def _save_checkpoint(path: Path, model, optimizer, state: dict) -> None:
    """Atomically replace ``path`` with the adapter weights, optimizer state and ``state``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(weights, str(tmp / _CKPT_WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / _CKPT_OPTIM)
        (tmp / _CKPT_STATE).write_text(json.dumps(state))
        old = None
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_checkpoint(path: Path, model, optimizer, params: TrainParams, device) -> dict | None:
    """Restore from ``path`` if it holds a checkpoint; returns its state dict or None."""
    if not (path / _CKPT_STATE).exists():
        return None
    state = json.loads((path / _CKPT_STATE).read_text())
    saved = state.get("params", {})
    for key in ("rank", "alpha", "target_modules", "batch_size", "seed"):
        if saved.get(key) != getattr(params, key):
            raise TrainError("EINVAL", f"checkpoint {path} was made with {key}={saved.get(key)!r},"
                                       f" not {getattr(params, key)!r}")
    set_peft_model_state_dict(model, load_file(str(path / _CKPT_WEIGHTS), device=str(device)))
    optimizer.load_state_dict(torch.load(path / _CKPT_OPTIM, map_location=device))
    return state


# ---- the loop -------------------------------------------------------------------------------

def train_lora(base_model_path: str, train: Iterable[Record], val: Iterable[Record],
               params: dict, out_dir: str | os.PathLike, device: str = "cpu",
               on_progress: Callable[[dict], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict:
    """Train a LoRA adapter for ``base_model_path`` on ``train``; evaluate on ``val`` before
    training and after each epoch. See the module doc for what is promised about ``out_dir``
    and checkpoints.

    Returns ``{"state": "done" | "cancelled", "step", "total_steps", "epoch",
    "initial_eval_loss", "final_eval_loss", "resumed_from_step", "out_dir", "checkpoint_dir"}``.
    ``on_progress`` gets ``{"step", "epoch", "loss", "eval_loss", "tokens_per_s"}`` after every
    step (``eval_loss`` is the latest evaluation).
    """
    p = TrainParams.from_dict(dict(params))
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise TrainError("EEXIST", f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(p.checkpoint_dir) if p.checkpoint_dir else out_dir.with_name(out_dir.name + ".ckpt")
    train, val = list(train), list(val)
    if not train:
        raise TrainError("EINVAL", "no training records")

    torch.manual_seed(p.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32)
    targets = p.target_modules if p.target_modules is not None else default_target_modules(base)
    p.target_modules = targets
    config = LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(base, config).to(device)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad],
                                  lr=p.lr, weight_decay=p.weight_decay)

    train_ex = [encode(tokenizer, r, p.max_tokens) for r in train]
    val_ex = [encode(tokenizer, r, p.max_tokens) for r in val]
    per_epoch = math.ceil(len(train_ex) / p.batch_size)
    total_steps = per_epoch * p.epochs
    if p.max_steps is not None:
        total_steps = min(total_steps, p.max_steps)

    resumed = _load_checkpoint(ckpt_dir, model, optimizer, p, device)
    step = resumed["step"] if resumed else 0
    initial_eval = resumed["initial_eval_loss"] if resumed else \
        _evaluate(model, val_ex, p.batch_size, pad_id, device)
    eval_loss = resumed["eval_loss"] if resumed else initial_eval
    eval_history = resumed["eval_history"] if resumed else [initial_eval]

    def checkpoint():
        _save_checkpoint(ckpt_dir, model, optimizer, dict(
            step=step, initial_eval_loss=initial_eval, eval_loss=eval_loss,
            eval_history=eval_history, params=asdict(p)))

    def result(state: str) -> dict:
        return dict(state=state, step=step, total_steps=total_steps,
                    epoch=step / per_epoch, initial_eval_loss=initial_eval,
                    final_eval_loss=eval_loss, eval_history=list(eval_history),
                    resumed_from_step=resumed["step"] if resumed else None,
                    out_dir=str(out_dir) if state == "done" else None,
                    checkpoint_dir=str(ckpt_dir) if ckpt_dir.exists() else None)

    model.train()
    while step < total_steps:
        epoch, skip = divmod(step, per_epoch)
        batches = _batches(train_ex, _epoch_order(len(train_ex), p.seed, epoch), p.batch_size, pad_id)
        for i, (ids, mask, labels) in enumerate(batches):
            if i < skip:
                continue                # resumed mid-epoch: these were already seen
            if step >= total_steps:
                break
            if should_stop is not None and should_stop():
                checkpoint()
                return result("cancelled")
            t0 = time.perf_counter()
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        labels=labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if p.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), p.max_grad_norm)
            optimizer.step()
            step += 1
            if step % per_epoch == 0 or step == total_steps:
                eval_loss = _evaluate(model, val_ex, p.batch_size, pad_id, device)
                eval_history.append(eval_loss)
            if p.checkpoint_every and step % p.checkpoint_every == 0 and step < total_steps:
                checkpoint()
            if on_progress is not None:
                on_progress(dict(step=step, epoch=step / per_epoch, loss=float(out.loss.detach()),
                                 eval_loss=eval_loss,
                                 tokens_per_s=int(mask.sum()) / max(time.perf_counter() - t0, 1e-9),
                                 step_s=time.perf_counter() - t0))

    if p.keep_checkpoint:
        checkpoint()
    _publish(model, out_dir, dict(
        initial_eval_loss=initial_eval, final_eval_loss=eval_loss, eval_history=eval_history,
        steps=step, num_train=len(train_ex), num_val=len(val_ex), base_model=str(base_model_path),
        params=asdict(p)))
    if not p.keep_checkpoint:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result("done")


def _publish(model, out_dir: Path, metrics: dict) -> None:
    """Write the adapter and metrics beside ``out_dir`` and rename into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
