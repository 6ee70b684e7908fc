"""The generation engine: continuous batching on one dedicated thread.

Each step of the loop, gpt-fast style, is short enough to hold in your head:

    retire   sequences that finished or whose client left give back their
             cache slot and adapter hold;
    admit    waiting requests take free cache slots (their settings checked
             first: a bad one fails alone, holding nothing);
    prefill  at most one chunk of prompt tokens (`scheduler.prefill_chunks`)
             for the requests being admitted, batched; a request whose prompt
             is complete samples its first token and starts decoding;
    decode   one forward for every decoding sequence, one token each, then a
             vectorised sample (`sampler.sample`) and text out.

The KV cache (`kv_cache.SlotCache`) has one row per slot, written in place,
so joining and leaving never copy anyone's cache, and a long prompt holds
running streams up for one chunk at most. Its rows and length grow on demand;
on CPU a request waits rather than take it past `kv_cache_bytes`. A prompt that starts like an
earlier one (a system prompt) copies that prefix's keys and values from
`prefix_cache.PrefixCache` instead of computing them again. The model is the unmodified
transformers model (Llama, Qwen2, ... alike) driven through `runner.Runner`.

Isolation: a request fails alone. Its settings are checked at admission; a
batched prefill or decode forward that raises is retried row by row, so only
the row that fails on its own is failed; a row whose scores are not finite is
failed by itself (sampling never raises). Every way out releases the slot and
the adapter hold.

Each row may use a different LoRA adapter: peft's mixed-batch forward
(`adapter_names=[...]`) applies each row's adapter to that row only. A request
holds its adapter version from submit to finish, so hot-swaps never change a
running answer.

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
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from model.adapters import AdapterTable
from model.detokenize import IncrementalDetokenizer, StopStrings
from model.metrics import WorkerMetrics
from model.packed_linear import pack_linears, supported as packing_supported
from model.prefix_cache import PrefixCache
from model.runner import Runner
from model.sampler import Sampled, SamplingRow, sample
from model.scheduler import Chunk, Slots, prefill_chunks
from model.sequence import Phase, Sequence, check_sampling

__all__ = ["Engine", "QueueFull", "Sequence"]

log = logging.getLogger("loopcord.worker")

IDLE_WAIT_S = 0.5  # how long the idle loop sleeps between checks for work
# An idle engine woken by one request waits at most this long for requests the server has announced
# (`expect`: received, being tokenized) so that a burst is prefilled as one batch: eight at once were
# admitted as 2 + 6, the six waiting out the two's prefill and a decode step (TTFT 180 ms against 55).
ARRIVAL_WAIT_S = 0.01
UNHEALTHY_AFTER_FAILURES = 3  # requests failed by the model in a row before /health says so
DEFAULT_MAX_LEN = 32768  # cache positions per slot when the model does not say
# oneDNN pre-packed weights on CPU: 1.4-1.5x aggregate at 8 streams on the Qwen2.5-0.5B shape, same at 1
# (benchmarks/serve_bench.py --pack-ab); numerically a different summation order (~1e-4 in float32 logits).
PACK_CPU_WEIGHTS = True
# An idle engine keeps a cache up to this size: a chat's next request then reuses warm memory instead of
# faulting fresh pages in (~5-10 ms of its time to first token on this VM); bigger ones are given back.
IDLE_KEEP_CACHE_BYTES = 64 * 2**20
DECODE_HEADROOM = 128  # answer tokens reserved in the cache at admission (it grows beyond as needed)
# KV cache budget on CPU: admissions wait rather than take the cache past it (decode may still grow a
# running request's room beyond it). 384 MiB holds ~8.7k float32 positions of SmolLM2 (46 KB each): all
# 32 slots of short chats, or 3-4 streams of 2k context at once, and keeps the worker (1.0 GiB of weights
# and runtime) under 2 GB (640 MiB measured 2.06 GiB peak with 32 x 2k prompts submitted at once).
CPU_KV_CACHE_BYTES = 384 * 2**20


def default_kv_cache_bytes(device: str) -> Optional[int]:
    """None (unbounded: the batch limit bounds it) on accelerators, whose memory the worker has to itself."""
    return CPU_KV_CACHE_BYTES if device == "cpu" else None


class QueueFull(Exception):
    pass


@dataclass
class _Command:
    fn: Callable[[], object]
    future: concurrent.futures.Future
    when_idle: bool  # wait until nothing is running or waiting (sleep, shutdown)


def _sampling_row(seq: Sequence) -> SamplingRow:
    return SamplingRow(seq.temperature, seq.top_p, seq.generator)


class Engine:
    def __init__(self, model, tokenizer, eos_ids: set[int], device: str, max_batch_size: int,
                 max_queue: int, adapters: AdapterTable, metrics: WorkerMetrics, pack_weights: Optional[bool] = None,
                 kv_cache_bytes: Optional[int] = -1, fast_decode: bool = True):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.adapters = adapters
        self.metrics = metrics
        # -1: the default for the device (bounded on CPU, where the cache shares the machine's RAM)
        self.kv_cache_bytes = default_kv_cache_bytes(device) if kv_cache_bytes == -1 else kv_cache_bytes
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        max_len = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LEN
        dtype = next(model.parameters()).dtype
        if (PACK_CPU_WEIGHTS if pack_weights is None else pack_weights) and packing_supported(device, dtype):
            pack_linears(model)
        self.runner = Runner(model, device, self.pad_id, max_batch_size, max_len, fast_decode)
        self.runner.empty_cache().max_bytes = self.kv_cache_bytes  # the cache's row rounding stays under it
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.sleeping = False
        self.slots = Slots(max_batch_size)
        self.prefix = PrefixCache()
        self._prefilling: list[Sequence] = []  # hold slots, prompt not fully fed yet (admission order)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._arriving = 0  # announced by `expect`, not yet submitted
        self._commands: collections.deque[_Command] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        # Requests the model itself failed (not the request's fault) since the last one it
        # answered: from UNHEALTHY_AFTER_FAILURES on, /health stops saying ok.
        self.failures_in_a_row = 0
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # The adapter methods below (worker-owned) change these; the runner holds the real state.
    @property
    def model(self):
        return self.runner.model

    @model.setter
    def model(self, value) -> None:
        self.runner.model = value

    @property
    def peft(self) -> bool:
        return self.runner.peft

    @peft.setter
    def peft(self, value: bool) -> None:
        self.runner.peft = value

    @property
    def _active(self) -> Optional[str]:
        return self.runner._active

    @_active.setter
    def _active(self, value: Optional[str]) -> None:
        self.runner._active = value

    # ---------------- called from the HTTP side (any thread) ----------------

    def start(self) -> None:
        self._thread.start()

    def expect(self) -> None:
        """A request is on its way (the server is tokenizing it): an idle engine about to admit
        waits for it briefly (ARRIVAL_WAIT_S). Every `expect` is followed by `submit(expected=True)`
        or `unexpect`."""
        with self._cond:
            self._arriving += 1

    def unexpect(self) -> None:
        """An expected request will not come (refused before it was submitted)."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify()

    def submit(self, seq: Sequence, expected: bool = False) -> None:
        with self._cond:
            if expected:
                self._arriving -= 1
            if len(self._waiting) >= self.max_queue:
                self._cond.notify()
                raise QueueFull
            self._waiting.append(seq)
            self._cond.notify()
        self._publish_load()

    def cancel(self, seq: Sequence) -> None:
        """The client left: the sequence leaves (and frees its slot) at the next step boundary."""
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
        return len(self.slots.owner)

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
                idle = not self.slots.owner and not self._waiting
                if self._stop:
                    break
                if idle and not self._commands:
                    self._cond.wait(IDLE_WAIT_S)
                    continue
            self._run_commands(idle)  # outside inference mode: adapter loads build ordinary tensors
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a failure outside any one request (e.g. out of memory)
                log.exception("generation step failed")
                self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
            self._publish_load()

    def _step(self) -> None:
        self._retire()
        self._admit()
        chunks = prefill_chunks(self._prefilling)
        if chunks:
            self._prefill(chunks)
        self._decode()
        self._retire()
        if not self.slots.owner and self.runner.cache_bytes() > IDLE_KEEP_CACHE_BYTES:
            self.runner.release_cache()  # idle: give a large cache's memory back

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

    # ---------------- admission ----------------

    def _admit(self) -> None:
        """Waiting requests take free slots; one whose settings cannot run fails alone.

        A request waits (in order) while its cache room would take the cache past `kv_cache_bytes`,
        unless nothing else runs: memory stays bounded however many long prompts arrive at once.
        """
        admitted: list[Sequence] = []
        if not self.slots.owner:  # nobody decodes yet: let an announced burst arrive and start together
            deadline = time.monotonic() + ARRIVAL_WAIT_S
            with self._cond:
                while self._arriving > 0 and not self._stop and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
        cache = self.runner.empty_cache()
        rows, length = cache.rows, cache.capacity
        while not self.sleeping and self.slots.free():
            with self._cond:
                if not self._waiting:
                    break
                seq = self._waiting[0]
                if seq.cancelled:
                    self._waiting.popleft()
                    self._release(seq)
                    continue
                # Room for the whole prompt and some answer now: requests admitted together grow the
                # cache once, instead of once per admission or per prefill chunk.
                want = min(len(seq.prompt_ids) + min(seq.max_tokens, DECODE_HEADROOM), self.runner.max_len)
                need_rows, need_len = max(rows, self.slots.next_free() + 1), max(length, want)
                if (self.kv_cache_bytes is not None and (self.slots.owner or admitted)
                        and cache.bytes_for(need_rows, need_len) > self.kv_cache_bytes):
                    break
                self._waiting.popleft()
                # take the slot under the lock, so running() + waiting() never dips for a drain check
                self.slots.take(seq)
            try:
                check_sampling(seq, self.vocab_size)
                seq.detok = IncrementalDetokenizer(self.tokenizer)
                seq.stops = StopStrings(seq.stop)
                if seq.seed is not None:
                    seq.generator = torch.Generator().manual_seed(seq.seed)
            except Exception as exc:
                self._finish_error(seq, f"invalid request: {exc}")
                self._release(seq)
                continue
            rows, length = need_rows, need_len
            admitted.append(seq)
        if not admitted:
            return
        cache = self.runner.cache_for(length, rows)
        for seq in admitted:
            seq.phase = Phase.PREFILLING
            self._prefilling.append(seq)
            seq.cached = self.prefix.load(cache, seq.slot, seq.prompt_ids, seq.adapter_name)

    # ---------------- prefill ----------------

    def _prefill(self, chunks: list[Chunk]) -> None:
        seqs = [c.seq for c in chunks]
        try:
            logits = self.runner.chunk([s.slot for s in seqs], [s.cached for s in seqs],
                                       [c.tokens for c in chunks], [s.adapter_name for s in seqs])
        except Exception as exc:
            if len(chunks) == 1:
                log.exception("prefill failed for one request")
                self._model_failed(seqs[0], f"prefill failed: {type(exc).__name__}: {exc}")
                return
            for chunk in chunks:  # find the one that fails on its own; the others go on
                self._prefill([chunk])
            return
        self.metrics.tokens(prompt=sum(len(c.tokens) for c in chunks))
        done = [i for i, c in enumerate(chunks) if c.last]
        for c in chunks:
            c.seq.cached += len(c.tokens)
        if not done:
            return
        ready = [seqs[i] for i in done]
        for seq in ready:
            self._prefilling.remove(seq)
            seq.phase = Phase.DECODING
        self._accept(ready, sample(logits[done], [_sampling_row(s) for s in ready]))
        for seq in ready:
            if seq.finish_reason != "error":  # never keep keys of a row whose scores went bad
                self.prefix.store(self.runner.cache, seq.slot, seq.prompt_ids, seq.adapter_name)

    # ---------------- decode ----------------

    def _decode(self) -> None:
        rows = self.slots.decode_rows()
        if rows == 0:
            return
        owners = [self.slots.owner.get(i) for i in range(rows)]
        live = [i for i, s in enumerate(owners) if s is not None and s.phase == Phase.DECODING]
        seqs = [owners[i] for i in live]
        self.metrics.observe("batch_size", len(seqs))
        filler = seqs[0].adapter_name  # dummy rows ride on a live row's adapter: keeps the one-adapter path
        tokens, starts, names = [], [], []
        for s in owners:
            real = s is not None and s.phase == Phase.DECODING
            tokens.append(s.generated[-1] if real else self.pad_id)
            starts.append(s.cached if s is not None else 0)
            names.append(s.adapter_name if real else filler)
        try:
            logits = self.runner.decode(torch.tensor(tokens), starts, names)[live]
        except Exception:
            log.exception("batched decode failed; retrying row by row")
            self._decode_alone(seqs)
            return
        for seq in seqs:
            seq.cached += 1
        self._accept(seqs, sample(logits, [_sampling_row(s) for s in seqs]))

    def _decode_alone(self, seqs: list[Sequence]) -> None:
        """Isolation fallback: each row in its own forward; a row that fails alone is failed alone."""
        for seq in seqs:
            try:
                logits = self.runner.chunk([seq.slot], [seq.cached], [[seq.generated[-1]]], [seq.adapter_name])
            except Exception as exc:
                self._model_failed(seq, f"generation failed: {type(exc).__name__}: {exc}")
                continue
            seq.cached += 1
            self._accept([seq], sample(logits, [_sampling_row(seq)]))

    # ---------------- tokens out ----------------

    def _accept(self, seqs: list[Sequence], sampled: Sampled) -> None:
        """Hand each sequence its new token: text out, and decide whether it is done."""
        now = time.monotonic()
        for seq, token, bad in zip(seqs, sampled.tokens.tolist(), sampled.bad.tolist()):
            if seq.finish_reason is not None:
                continue
            if bad:
                self._finish_error(seq, "the model produced non-finite scores for this request "
                                        "(a broken adapter or numeric overflow); nothing else was affected")
                if seq.slot is not None and self.runner.cache is not None:
                    self.runner.cache.clear_slot(seq.slot)
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
        seq.phase = Phase.FINISHED
        self.failures_in_a_row = 0
        seq.emit(("done", reason, len(seq.prompt_ids), len(seq.generated)))

    @property
    def healthy(self) -> bool:
        """False once UNHEALTHY_AFTER_FAILURES requests in a row failed in the model (vLLM's
        engine-dead): answers are failing, whatever else still works."""
        return self.failures_in_a_row < UNHEALTHY_AFTER_FAILURES

    def _model_failed(self, seq: Sequence, message: str) -> None:
        if seq.finish_reason is None:
            self.failures_in_a_row += 1
        self._finish_error(seq, message)

    def _finish_error(self, seq: Sequence, message: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = "error"
            seq.phase = Phase.FINISHED
            seq.emit(("error", message))

    # ---------------- leaving ----------------

    def _retire(self) -> None:
        for seq in list(self.slots.owner.values()):
            if seq.finish_reason is not None or seq.cancelled:
                if seq in self._prefilling:
                    self._prefilling.remove(seq)
                seq.phase = Phase.FINISHED
                self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Give back the slot and the adapter hold; delete a replaced adapter version once unused."""
        self.slots.give_back(seq)
        version, seq.adapter = seq.adapter, None
        if version is not None and self.adapters.release(version):
            self.delete_adapter(version.internal)

    def _fail_all(self, message: str) -> None:
        for seq in list(self.slots.owner.values()):
            self._model_failed(seq, message)
        self._retire()
        self.runner.release_cache()
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
            if not self.model.peft_config:
                # peft keeps looking up the deleted (last) adapter's config on every forward:
                # with none left, serve the plain base model again (its layers as they were).
                self.model = self.model.unload()
                self.peft = False

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
