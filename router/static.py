"""StaticEncoder: prompt features from a static token-embedding table distilled from all-MiniLM-L6-v2.

model2vec's idea, with no extra dependency: every vocabulary token is encoded
once, alone (``[CLS] token [SEP]`` through MiniLM, mean-pooled), and a prompt's
feature is the mean of its tokens' rows weighted by log(1 + token id) (WordPiece
ids grow roughly with rarity, so frequent tokens weigh less), L2-normalised. No
transformer runs per prompt: tokenising and one ``embedding_bag`` cost ~0.1 ms
for one prompt and grow far less than MiniLM's forward pass with the batch,
which is what keeps routing latency flat under concurrency
(results/routing/concurrency.json). Held-out accuracy on the real suite's six
skills: the gate as good as on MiniLM features, nearest-exemplar voting worse
(results/routing/encoder_options.json) — use it with the gate.

The table (30,522 × 384 float32, 47 MB) takes ~30 s to distil on one core. It is
cached as safetensors under ``cache_dir`` (default ``$DELTASERVE_CACHE_DIR``,
else ``$XDG_CACHE_HOME/deltaserve`` or ``~/.cache/deltaserve``), written
atomically, with the SHA-256 of the MiniLM weights it came from and of its own
bytes in its metadata; a file whose digests do not match (another MiniLM, a
torn or edited file) is distilled again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from pathlib import Path

import numpy as np
import torch

from deltaserve.experts.manifest import sha256_file
from deltaserve.router.features import CachedEncoder, minilm_path

log = logging.getLogger(__name__)

DISTILL_VERSION = "cls-token-sep-mean-v1"
# Calibrated on the zoo with this encoder, as router/base.py's DEFAULT_MAX_DISTANCE is for MiniLM:
#   .venv/bin/python -m bench.routing.calibrate --encoder static --out results/routing/calibration_static.json
STATIC_MAX_DISTANCE = 0.21
STATIC_MIN_CONFIDENCE = 0.25


def default_cache_dir() -> Path:
    if os.environ.get("DELTASERVE_CACHE_DIR"):
        return Path(os.environ["DELTASERVE_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "deltaserve"


def _table_sha256(table: torch.Tensor) -> str:
    return hashlib.sha256(table.numpy().tobytes()).hexdigest()


@torch.inference_mode()
def distil_table(model: torch.nn.Module, tokenizer, batch: int = 1024) -> torch.Tensor:
    """(vocab, dim) float32: each token id encoded alone between [CLS] and [SEP], mean-pooled."""
    rows = []
    for start in range(0, tokenizer.vocab_size, batch):
        ids = torch.arange(start, min(tokenizer.vocab_size, start + batch))
        triple = torch.stack([torch.full_like(ids, tokenizer.cls_token_id), ids,
                              torch.full_like(ids, tokenizer.sep_token_id)], 1)
        hidden = model(input_ids=triple, attention_mask=torch.ones_like(triple)).last_hidden_state
        rows.append(hidden.float().mean(1))
    return torch.cat(rows).contiguous()


def load_or_distil(model_dir: Path, cache_dir: Path) -> torch.Tensor:
    """The table for ``model_dir``'s MiniLM: from the cache when its digests check, else distilled and cached."""
    from safetensors import safe_open
    from safetensors.torch import save

    from deltaserve.experts.atomic import write_bytes_atomic

    source = sha256_file(model_dir / "model.safetensors")
    path = cache_dir / f"minilm-static-{source[:16]}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                table = fh.get_tensor("table")
            if (meta.get("source_sha256") == source and meta.get("version") == DISTILL_VERSION
                    and meta.get("table_sha256") == _table_sha256(table)):
                return table
            log.warning("static encoder cache %s does not match its digests; distilling again", path)
        except Exception as err:  # noqa: BLE001 - a torn or foreign file is rebuilt, never served
            log.warning("static encoder cache %s unreadable (%s); distilling again", path, type(err).__name__)
    from sentence_transformers import SentenceTransformer

    log.info("distilling the static encoder's table from %s (about 30 s, once)", model_dir)
    st = SentenceTransformer(str(model_dir), device="cpu")
    table = distil_table(st[0].auto_model.eval(), st.tokenizer)
    meta = {"source_sha256": source, "version": DISTILL_VERSION,
            "table_sha256": _table_sha256(table)}
    try:
        write_bytes_atomic(path, save({"table": table}, metadata=meta))
    except OSError as err:   # a read-only home: serve from memory, distil again next start
        log.warning("could not cache the static encoder's table in %s (%s); next start distils it again",
                    cache_dir, err.strerror or type(err).__name__)
    return table


class StaticEncoder(CachedEncoder):
    """Static token embeddings distilled from all-MiniLM-L6-v2 (384-d), cached by text like every encoder."""

    name = "static"
    default_max_distance = STATIC_MAX_DISTANCE     # the policy's thresholds for these features
    default_min_confidence = STATIC_MIN_CONFIDENCE

    def __init__(self, model_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 batch_size: int = 64, cache_size: int = 4096, max_length: int = 128):
        super().__init__(batch_size, cache_size)
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else minilm_path()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.table = load_or_distil(self.model_dir, self.cache_dir)
        self.dim = int(self.table.shape[1])
        # each row scaled by its token's weight once, so a prompt is one unweighted embedding_bag sum
        self._weighted = self.table * torch.log1p(torch.arange(self.table.shape[0], dtype=torch.float32))[:, None]
        self.max_length = max_length
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)._tokenizer   # the Rust tokenizer

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        with self._tokenizer_lock:
            encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [e.ids[: self.max_length] for e in encodings]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        # numpy from the id lists: torch.tensor() on a Python list costs ~2 us per id (1.3 ms per 32 prompts)
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
        summed = torch.nn.functional.embedding_bag(torch.from_numpy(flat), self._weighted,
                                                   torch.from_numpy(offsets), mode="sum")
        return torch.nn.functional.normalize(summed, dim=-1).numpy().astype(np.float32, copy=False)
