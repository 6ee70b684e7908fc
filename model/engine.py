"""The generation engine: continuous batching on one dedicated thread.

The loop, gpt-fast style, is three steps you can hold in your head:

    admit   take waiting requests, `prefill` them as one left-padded batch and
            merge their KV cache into the running batch (left-padding again);
    decode  `decode_step` feeds every running sequence its last token, one
            forward pass for the whole batch, and samples the next tokens;
    retire  sequences that hit EOS, a stop string, max_tokens or whose client
            left are sliced out of the batch (cache rows and mask rows).

New requests therefore join between decode steps and finished ones leave at
once. Each row may use a different LoRA adapter: peft's mixed-batch forward
(`adapter_names=[...]`) applies each row's adapter to that row only.

The HTTP side never touches torch: it `submit`s a `Sequence` whose `emit`
callback is thread-safe, and runs model changes (adapter load, sleep) through
`call`, which executes them on this thread between steps.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from transformers import DynamicCache

from model.adapters import AdapterTable, AdapterVersion
from model.detokenize import IncrementalDetokenizer, StopStrings
from model.metrics import WorkerMetrics

log = logging.getLogger("loopcord.worker")

# Prompt tokens prefilled in one admission step (at least one request always
# joins), so a burst of long prompts cannot spike memory or stall decoding long.
PREFILL_TOKEN_BUDGET = 16384
IDLE_WAIT_S = 0.5  # how long the idle loop sleeps between checks for work
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
MIXED_ADAPTERS = "__mixed__"  # engine state: rows use different adapters


class QueueFull(Exception):
    pass


@dataclass
class Sequence:
    """One chat request inside the engine."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]  # thread-safe; gets ("delta", text) then ("done", reason, usage) or ("error", msg)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    adapter: Optional[AdapterVersion] = None  # held version; None = base model
    arrival: float = field(default_factory=time.monotonic)
    # runtime state
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: Optional[str] = None
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    detok: Optional[IncrementalDetokenizer] = None
    stops: Optional[StopStrings] = None
    generator: Optional[torch.Generator] = None


@dataclass
class Batch:
    """The running sequences and their shared, left-padded KV cache."""

    seqs: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # [B, L] 1 = real token, 0 = left padding
    next_tokens: torch.Tensor  # [B] last sampled token, input of the next decode step


@dataclass
class _Command:
    fn: Callable[[], object]
    future: concurrent.futures.Future
    when_idle: bool  # wait until nothing is running or waiting (sleep, shutdown)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_batches(a: Batch, b: Batch) -> Batch:
    """Stack two batches: left-pad the shorter cache and mask, concatenate rows."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([_pad_left(la.keys, width, 2), _pad_left(lb.keys, width, 2)], dim=0)
        la.values = torch.cat([_pad_left(la.values, width, 2), _pad_left(lb.values, width, 2)], dim=0)
    mask = torch.cat([_pad_left(a.mask, width, 1), _pad_left(b.mask, width, 1)], dim=0)
    return Batch(a.seqs + b.seqs, a.cache, mask, torch.cat([a.next_tokens, b.next_tokens]))


def select_rows(batch: Batch, keep: list[int]) -> Batch:
    """Keep only rows `keep`, then drop leading columns that are padding in every row."""
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[index]
    used = (mask.sum(0) > 0).nonzero()
    start = int(used[0]) if len(used) else 0
    for layer in batch.cache.layers:
        layer.keys = layer.keys[index, :, start:]
        layer.values = layer.values[index, :, start:]
    return Batch([batch.seqs[i] for i in keep], batch.cache, mask[:, start:], batch.next_tokens[index])


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else temperature + top-p (nucleus)."""
    tokens = logits.argmax(-1)
    for i, seq in enumerate(seqs):
        if seq.temperature == 0:
            continue
        probs = torch.softmax(logits[i].float() / seq.temperature, -1)
        if seq.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > seq.top_p  # keep the token that crosses top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        gen = seq.generator
        tokens[i] = torch.multinomial(probs.to("cpu") if gen is not None else probs, 1, generator=gen).item()
    return tokens


class Engine:
    def __init__(self, model, tokenizer, eos_ids: set[int], device: str, max_batch_size: int,
                 max_queue: int, adapters: AdapterTable, metrics: WorkerMetrics):
        self.model = model  # the base model, or the PeftModel wrapping it once an adapter is loaded
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.adapters = adapters
        self.metrics = metrics
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        self.peft = False  # becomes True when the first adapter wraps the model
        self._active: Optional[str] = None  # which adapter state the peft layers are set to
        self.sleeping = False
        self.batch: Optional[Batch] = None
        self._admitting: list[Sequence] = []  # taken from the queue, being prefilled
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._commands: collections.deque[_Command] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ---------------- called from the HTTP side (any thread) ----------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(seq)
            self._cond.notify()
        self._publish_load()

    def cancel(self, seq: Sequence) -> None:
        """The client left: the sequence leaves the batch at the next step boundary."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify()

    def call(self, fn: Callable[[], object], when_idle: bool = False) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between steps; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._commands.append(_Command(fn, future, when_idle))
            self._cond.notify()
        return future

    def running(self) -> int:
        batch = self.batch
        return (len(batch.seqs) if batch is not None else 0) + len(self._admitting)

    def waiting(self) -> int:
        return len(self._waiting)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---------------- the engine thread ----------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled_waiting()
                idle = self.batch is None and not self._waiting
                if self._stop:
                    break
                if idle and not self._commands:
                    self._cond.wait(IDLE_WAIT_S)
                    continue
            self._run_commands(idle)
            try:
                joiners = self._take_joiners()
                if joiners:
                    self._admit(joiners)
                if self.batch is not None:
                    self._decode_step()
                    self._retire()
            except Exception as exc:  # a failed forward (e.g. out of memory) fails its requests, not the worker
                log.exception("generation step failed")
                self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
            self._publish_load()

    def _run_commands(self, idle: bool) -> None:
        deferred = []
        while True:
            with self._cond:
                if not self._commands:
                    self._commands.extend(deferred)
                    return
                cmd = self._commands.popleft()
            if cmd.when_idle and not idle:
                deferred.append(cmd)
                continue
            try:
                cmd.future.set_result(cmd.fn())
            except BaseException as exc:  # handed to the caller, who turns it into an HTTP answer
                cmd.future.set_exception(exc)

    def _drop_cancelled_waiting(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._release(seq)

    def _take_joiners(self) -> list[Sequence]:
        if self.sleeping:
            return []
        room = self.max_batch_size - self.running()
        joiners, budget = [], PREFILL_TOKEN_BUDGET
        with self._cond:
            while self._waiting and len(joiners) < room:
                seq = self._waiting[0]
                if joiners and len(seq.prompt_ids) > budget:
                    break
                self._waiting.popleft()
                budget -= len(seq.prompt_ids)
                joiners.append(seq)
            self._admitting = joiners
        return joiners

    def _select_adapters(self, seqs: list[Sequence]) -> dict:
        """Forward kwargs for this batch's adapters.

        A batch on one adapter (the common case: everyone talks to the promoted
        alias) or on the bare base runs as a plain forward with that adapter
        active; only a mixed batch pays for peft's per-row `adapter_names` path.
        """
        if not self.peft:
            return {}
        names = [s.adapter.internal if s.adapter else BASE_ADAPTER for s in seqs]
        state = names[0] if len(set(names)) == 1 else MIXED_ADAPTERS
        if state != self._active:
            tuner = self.model.base_model
            if state == BASE_ADAPTER:
                tuner.disable_adapter_layers()
            else:
                tuner.enable_adapter_layers()
                if state != MIXED_ADAPTERS:
                    tuner.set_adapter(state, inference_mode=True)
            self._active = state
        return {"adapter_names": names} if state == MIXED_ADAPTERS else {}

    def _forward(self, seqs: list[Sequence], input_ids, mask, position_ids, cache):
        kwargs = self._select_adapters(seqs)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
        return out.logits[:, -1, :]

    def prefill(self, seqs: list[Sequence]) -> Batch:
        """Run the prompts of `seqs` (left-padded together); sample each one's first token."""
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._config())
        logits = self._forward(seqs, ids, mask, positions, cache)
        return Batch(seqs, cache, mask, sample(logits, seqs))

    def decode_step(self, batch: Batch) -> torch.Tensor:
        """One token for every running sequence; returns the sampled tokens."""
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.seqs), 1))], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        logits = self._forward(batch.seqs, batch.next_tokens[:, None], mask, positions, batch.cache)
        batch.mask = mask
        return sample(logits, batch.seqs)

    def _admit(self, joiners: list[Sequence]) -> None:
        for seq in joiners:
            seq.detok = IncrementalDetokenizer(self.tokenizer)
            seq.stops = StopStrings(seq.stop)
            if seq.seed is not None:
                seq.generator = torch.Generator().manual_seed(seq.seed)
        try:
            new = self.prefill(joiners)
        except Exception:
            for seq in joiners:
                self._finish_error(seq, "prefill failed")
                self._release(seq)
            self._admitting = []
            raise
        self.metrics.tokens(prompt=sum(len(s.prompt_ids) for s in joiners))
        self._accept(new.seqs, new.next_tokens)
        self.batch = new if self.batch is None else merge_batches(self.batch, new)
        self._admitting = []  # after the batch holds them, so running() never dips

    def _decode_step(self) -> None:
        batch = self.batch
        self.metrics.observe("batch_size", len(batch.seqs))
        batch.next_tokens = self.decode_step(batch)
        self._accept(batch.seqs, batch.next_tokens)

    def _accept(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Hand each sequence its new token: text out, and decide whether it is done."""
        now = time.monotonic()
        for seq, token in zip(seqs, tokens.tolist()):
            if seq.finish_reason is not None:
                continue
            self.metrics.observe("ttft" if not seq.generated else "tpot",
                                 now - (seq.arrival if not seq.generated else seq.last_token_at))
            seq.first_token_at = seq.first_token_at or now
            seq.last_token_at = now
            seq.generated.append(token)
            if token in self.eos_ids and not seq.ignore_eos:
                self._finish(seq, "stop")
                continue
            text = seq.stops.feed(seq.detok.push(token))
            if text:
                seq.emit(("delta", text))
            if seq.stops.stopped:
                self._finish(seq, "stop")
            elif len(seq.generated) >= seq.max_tokens:
                self._finish(seq, "length")
        self.metrics.tokens(generated=len(seqs))

    def _finish(self, seq: Sequence, reason: str) -> None:
        tail = seq.stops.feed(seq.detok.flush())
        tail += seq.stops.flush()
        if tail:
            seq.emit(("delta", tail))
        seq.finish_reason = reason
        seq.emit(("done", reason, len(seq.prompt_ids), len(seq.generated)))

    def _finish_error(self, seq: Sequence, message: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = "error"
            seq.emit(("error", message))

    def _retire(self) -> None:
        batch = self.batch
        keep = [i for i, s in enumerate(batch.seqs) if s.finish_reason is None and not s.cancelled]
        if len(keep) == len(batch.seqs):
            return
        for seq in batch.seqs:
            if seq.finish_reason is not None or seq.cancelled:
                self._release(seq)
        self.batch = select_rows(batch, keep) if keep else None

    def _release(self, seq: Sequence) -> None:
        """Give back the adapter hold; delete a replaced adapter version once unused."""
        version, seq.adapter = seq.adapter, None
        if version is not None and self.adapters.release(version):
            self.delete_adapter(version.internal)

    def _fail_all(self, message: str) -> None:
        if self.batch is not None:
            for seq in self.batch.seqs:
                self._finish_error(seq, message)
                self._release(seq)
            self.batch = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _publish_load(self) -> None:
        self.metrics.set_load(self.waiting(), self.running())

    def _config(self):
        return self.model.get_base_model().config if self.peft else self.model.config

    # ---------------- model changes (run through `call`) ----------------

    def load_adapter(self, internal: str, path: str, files=None) -> None:
        """Inject a LoRA adapter under a fresh internal name (engine thread only).

        `files` is the adapter already read into memory (model.adapters.read_adapter);
        the weights are never memory-mapped from `path`, which may be rewritten.
        """
        from model.adapters import attach, read_adapter

        self._active = None  # loading changes peft's active adapter: re-select before the next forward
        try:
            self.model = attach(self.model, internal, files or read_adapter(path, None))
            self.peft = True
        except Exception:
            self.delete_adapter(internal)
            raise

    def delete_adapter(self, internal: str) -> None:
        if self.peft and internal in self.model.peft_config:
            self._active = None
            self.model.delete_adapter(internal)
            log.info("deleted adapter version %s", internal)

    def offload(self) -> None:
        """Sleep: free accelerator memory held by weights and cache (run when idle)."""
        self.sleeping = True
        if self.device.startswith("cuda"):
            self.model.to("cpu")
            gc.collect()
            torch.cuda.empty_cache()

    def reload(self) -> None:
        if self.device.startswith("cuda"):
            self.model.to(self.device)
        self.sleeping = False
