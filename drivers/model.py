"""The model driver: loads a Hugging Face causal LM and executes the scheduler's StepPlans.

``execute(plan)`` applies the plan's block moves (swap out, swap in, copies — in that order),
then runs every chunk in one forward pass: all tokens packed into a single flat row
``input_ids [1, T]`` with per-chunk ``position_ids``, attention served from the paged KV cache
through ``llmos.drivers.attention``. Logits are computed only for the last token of chunks
that sample. The model code is transformers' own; nothing is rewritten.

LoRA adapters (``llmos.drivers.lora``) live in host memory and, ``adapter_slots`` at a time, on
the device; chunks with different adapters (and none) share the forward pass.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmos.drivers import attention, lora, lora_layers, probe, rope, selfcheck, state
from llmos.drivers import text as text_codec
from llmos.drivers.batch import StepPlan, StepResult
from llmos.drivers.device import Device, detect
from llmos.drivers.kv_cache import PagedKVCache
from llmos.drivers.sampler import sample

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ModelDriver:
    """One loaded model and its KV cache on one device.

    ``allocate_kv`` must be called before the first ``execute`` with chunks. The driver never
    reads scheduler state: everything it needs is in the plan.
    """

    def __init__(self, model_path: str, device: Device | str = "auto", dtype: str | None = None,
                 block_size: int = 16, name: str | None = None,
                 backend: attention.AttentionBackend | None = None, adapter_slots: int = 4):
        self.device = device if isinstance(device, Device) else detect(device)
        if dtype is None:
            torch_dtype = torch.bfloat16 if self.device.kind == "cuda" else torch.float32
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.backend = backend or attention.TorchBackend()
        self.name = name or os.path.basename(os.path.normpath(model_path))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # device_map loads the weights straight onto the device (no host-side full copy).
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=torch_dtype, attn_implementation=attention.register(),
                device_map=str(self.device.torch_device))
        except KeyError as exc:             # its attention code looks up known implementations only
            if attention.ATTN_IMPLEMENTATION not in str(exc):
                raise
            raise ValueError(f"{_architecture_of(model_path)}: its attention does not go through transformers' attention "
                             f"interface, so it cannot use the paged KV cache") from None
        self.model.eval()
        self.config = self.model.config
        self.architecture = (self.config.architectures or [type(self.model).__name__])[0]
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.dtype = _dtype_name(torch_dtype)
        self._torch_dtype = torch_dtype
        self._decoder = _decoder_of(self.model)          # hidden states, no LM head
        self._lm_head = self.model.get_output_embeddings()
        text = self.config.get_text_config()
        self.num_layers = text.num_hidden_layers
        self.rope = rope.SequenceRope(self.model, attention.rope_spans)
        self.max_model_len, self.max_packed_tokens = limits(self.config)
        self.eos_token_ids = self._find_eos_ids()
        self._logit_scale = float(getattr(text, "logit_scale", None) or 1.0) / float(
            getattr(text, "logits_scaling", None) or 1.0)
        self._final_softcap = float(getattr(text, "final_logit_softcapping", None) or 0.0)
        self.kv: PagedKVCache | None = None
        self.lora = lora.AdapterSlots(self.model, adapter_slots, self.device.torch_device)
        self.layout, self.recurrent = self._probe()   # what the cache holds, from the model's own calls
        # Recurrent-only models (Mamba): tokens keep no KV; a process holds one block, its state.
        self.token_blocks = self.layout is not None
        if not self.token_blocks:
            self.layout = state.state_only_layout(self.recurrent.num_bytes, block_size, torch_dtype)
        # blocks at the front of a process's table that hold its recurrent state (0: none)
        self.state_blocks = self.recurrent.blocks(self.kv_bytes_per_block()) if self.recurrent else 0
        # Recurrent layers whose code ignores a saved state over more than one new token (Mamba's
        # scan, Jamba, Zamba) continue one token per pass; the gate finds out which (selfcheck).
        self.stepwise = False
        selfcheck.check_cached(self, model_path)   # refused here unless the paged path is the model's own

    def _find_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model.generation_config, "eos_token_id", None),
                       self.config.get_text_config().eos_token_id, self.tokenizer.eos_token_id):
            if source is not None:
                ids.update([source] if isinstance(source, int) else source)
        return ids

    @torch.inference_mode()
    def _probe(self) -> tuple[probe.KVLayout | None, state.RecurrentState | None]:
        probing, text = probe.Probe(), self.config.get_text_config()
        kinds = state.recurrent_layer_types(text)
        cache = state.new_cache(self.model) if kinds else None
        try:
            with attention.use_context(probing):
                extra = {"cache": cache, "use_cache": True} if cache is not None else {"use_cache": False}
                self._decoder(input_ids=torch.tensor([[1]], device=self.device.torch_device),
                              position_ids=torch.tensor([[0]], device=self.device.torch_device), **extra)
            recurrent = state.RecurrentState(self.model, cache) if kinds else None
        except Exception as exc:
            raise ValueError(f"{self.architecture}: the paged path fails on one token at load "
                             f"({type(exc).__name__}: {exc})"[:400]) from exc
        if kinds and not probing.calls:
            return None, recurrent             # recurrent-only: its state is all it keeps
        return probe.kv_layout(self.architecture, probing), recurrent

    # -- memory ---------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a process of ``num_tokens`` tokens holds: its state blocks, then its KV."""
        return self.state_blocks + (-(-num_tokens // self.block_size) if self.token_blocks else 0)

    def kv_bytes_per_block(self) -> int:
        """Device bytes one KV block takes across all layers, K and V."""
        lay = self.layout
        return PagedKVCache.bytes_per_block(lay.num_layers, self.block_size, lay.num_kv_heads, lay.k_head_dim,
                                            self._torch_dtype, lay.v_head_dim)

    def allocate_kv(self, num_blocks: int, num_host_blocks: int) -> None:
        """(Re)allocate the device block pool and the host swap pool; old contents are lost."""
        self.kv = None                                  # free the old pool before the new one
        lay = self.layout
        self.kv = PagedKVCache(lay.num_layers, num_blocks, num_host_blocks, self.block_size, lay.num_kv_heads,
                               lay.k_head_dim, self._torch_dtype, self.device, lay.v_head_dim)

    # -- adapters -------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> dict:
        """Read the peft adapter at ``path`` into host memory under ``name``.
        -> {name, path, rank, alpha, target_modules, bytes}. FileNotFoundError / ValueError
        for a missing or unfit adapter (nothing is changed then)."""
        return self.lora.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (KeyError if unknown)."""
        self.lora.unload(name)

    def adapters(self) -> list[dict]:
        """Loaded adapters: name, path, rank, alpha, target_modules, bytes, where ("device" |
        "host"), slot (or None), last_used (wall time or None)."""
        return self.lora.listing()

    def adapter_bytes(self) -> dict:
        """{"host": bytes of all loaded adapters, "device": bytes of the slot stacks}."""
        return self.lora.num_bytes()

    # -- execution ------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Apply the plan's block moves, run its chunks in one forward pass, sample."""
        if self.kv is None:
            if plan.is_empty:
                return StepResult(plan.step_id)
            raise RuntimeError("allocate_kv() must be called before execute()")
        # Before any block moves: an unknown adapter or too many of them rejects the whole plan.
        lora_batch = self.lora.prepare(plan.chunks)
        self.kv.swap_out(plan.swap_out)
        self.kv.swap_in(plan.swap_in)
        self.kv.copy(plan.copies)
        if not plan.chunks:
            return StepResult(plan.step_id)
        if self.max_packed_tokens is not None and plan.num_tokens > self.max_packed_tokens:
            raise ValueError(f"{plan.num_tokens} tokens in one pass: this model serves at most "
                             f"{self.max_packed_tokens}")
        for c in plan.chunks:
            if c.end_pos > self.max_model_len:
                raise ValueError(f"pid {c.pid}: position {c.end_pos} exceeds max_model_len "
                                 f"{self.max_model_len}")
        dev = self.device.torch_device
        hidden, query_start = self.forward(plan.chunks, lora_batch)
        sampling = [(i, c) for i, c in enumerate(plan.chunks) if c.sample]
        if not sampling:
            return StepResult(plan.step_id, num_tokens=plan.num_tokens)
        rows = torch.tensor([query_start[i + 1] - 1 for i, _ in sampling], device=dev)
        logits = self.logits(hidden[rows])
        chunks = [c for _, c in sampling]
        tokens = sample(logits, [c.sampling for c in chunks], [c.end_pos for c in chunks],
                        [c.history for c in chunks])
        return StepResult(plan.step_id, sampled={c.pid: t for c, t in zip(chunks, tokens)},
                          num_tokens=plan.num_tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head and what the model does to its output (Granite's ``logits_scaling``,
        Cohere's ``logit_scale``, Gemma's final soft-cap), in float32."""
        logits = self._lm_head(hidden).float()
        if self._logit_scale != 1.0:
            logits = logits * self._logit_scale
        if self._final_softcap:
            logits = torch.tanh(logits / self._final_softcap) * self._final_softcap
        return logits

    def forward(self, chunks, lora_batch=None) -> tuple[torch.Tensor, list[int]]:
        """The decoder over ``chunks``, attention from the paged KV cache (each chunk's new K/V
        written into its blocks): hidden states [T, hidden] and each chunk's first row (B+1
        offsets). All chunks are packed in one row; with recurrent state, one pass per chunk
        (``stepwise``: one per token of a chunk that continues a saved state)."""
        if self.recurrent is None:
            hidden = self._pass(chunks, lora_batch)
            return hidden, list(itertools.accumulate((c.num_tokens for c in chunks), initial=0))
        k, hidden, query_start = self.state_blocks, [], [0]
        for c in chunks:
            if len(c.block_ids) < k + self.token_blocks:
                raise ValueError(f"pid {c.pid}: its block table has no room past its {k} state blocks")
            held = c.block_ids[:k]
            cache = self.recurrent.load(self.kv, held) if c.start_pos > 0 else state.new_cache(self.model)
            own = dataclasses.replace(c, block_ids=c.block_ids[k:])
            batch = self.lora.prepare([c]) if lora_batch is not None else None
            parts = [own]
            if self.stepwise and c.start_pos > 0:
                parts = [dataclasses.replace(own, token_ids=[t], start_pos=c.start_pos + i)
                         for i, t in enumerate(c.token_ids)]
            hidden += [self._pass([part], batch, cache) for part in parts]
            self.recurrent.save(self.kv, held, cache)
            query_start.append(query_start[-1] + c.num_tokens)
        return torch.cat(hidden), query_start

    def _pass(self, chunks, lora_batch, cache=None) -> torch.Tensor:
        dev = self.device.torch_device
        input_ids = torch.tensor([t for c in chunks for t in c.token_ids], device=dev)
        positions = torch.tensor([p for c in chunks for p in range(c.start_pos, c.end_pos)], device=dev)
        ctx = attention.AttentionContext.build(chunks, self.kv, self.backend) if self.token_blocks else None
        with attention.use_context(ctx), lora_layers.use_batch(lora_batch):
            extra = {"cache": cache, "use_cache": True} if cache is not None else {"use_cache": False}
            return self._decoder(input_ids=input_ids[None], position_ids=positions[None], **extra).last_hidden_state[0]

    # -- text -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return text_codec.encode(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        return text_codec.decode(self.tokenizer, ids)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return text_codec.apply_chat_template(self.tokenizer, messages)

    def to_host(self) -> None:
        """Evict: weights to host memory, the KV pool freed (processes must be gone)."""
        self.kv = None
        self.model.to("cpu")

    def to_device(self) -> None:
        """Bring host-resident weights back to this driver's device (allocate_kv follows)."""
        self.model.to(self.device.torch_device)

    def __repr__(self) -> str:
        return (f"ModelDriver({self.name!r}, {self.architecture}, {self.dtype}, "
                f"device={self.device.torch_device})")


# Past its sliding window, transformers' generate for these disagrees with their own forward pass
# (which the paged path matches): their context stops at the window (Moshi's equals its context).
WINDOW_IS_CONTEXT = ("MoshiForCausalLM",)


def limits(config) -> tuple[int, int | None]:
    """(the longest sequence, the most tokens in one pass or None) a model is served exactly
    within, from its config: the rope's context (``rope.context_len``), one attention chunk for
    chunked attention (Llama 4), the window where ``WINDOW_IS_CONTEXT``, and below Llama 4's
    ``floor_scale``: it scales its NoPE layers' queries by the row index of the pass (plus a
    cache length), which is the position only while both stay below it."""
    text = config.get_text_config()
    context, packed = rope.context_len(text), None
    if (config.architectures or [None])[0] in WINDOW_IS_CONTEXT and getattr(text, "sliding_window", None):
        context = min(context, int(text.sliding_window))
    if getattr(text, "attention_chunk_size", None):
        context = min(context, int(text.attention_chunk_size))
    if getattr(text, "attn_temperature_tuning", False) and getattr(text, "floor_scale", None):
        packed = int(text.floor_scale) - 1
        context = min(context, packed)
    return context, packed


def _architecture_of(model_path: str) -> str:
    config = AutoConfig.from_pretrained(model_path)
    return (config.architectures or [type(config).__name__])[0]


def _decoder_of(model):
    """The decoder stack under the LM head: ``base_model`` (found by ``base_model_prefix``), else
    ``get_decoder()``, else the ``model`` attribute most causal LMs keep it in (Llama-4's text
    model names its prefix ``language_model`` but keeps ``model``). The gate checks the result."""
    candidates = [model.base_model, model.get_decoder() if hasattr(model, "get_decoder") else None,
                  getattr(model, "model", None)]
    for decoder in candidates:
        if isinstance(decoder, torch.nn.Module) and decoder is not model:
            return decoder
    raise ValueError(f"{type(model).__name__}: cannot find its decoder under the LM head")
