"""Feature encoders: the fast path equals the library pipeline; cache and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltaserve.router.features import BaseHiddenStates, SentenceEncoder

TEXTS = ["Reverse the letters: abc", "How many vowels are in banana?", "The weather is nice today.",
         "Max digit of 90210?", "a much longer sentence " * 12]


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(1)
    return SentenceEncoder(batch_size=2, cache_size=3)


def test_sentence_encoder_matches_sentence_transformers(encoder):
    ours = encoder.encode(TEXTS)  # batches of 2 with padding
    reference = encoder.reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(ours[0], ours[1])


def test_cache_is_lru_and_returns_the_same_vectors(encoder):
    encoder.clear_cache()
    first = encoder.encode(TEXTS[:3])
    hits, misses = encoder.hits, encoder.misses
    again = encoder.encode([TEXTS[2], TEXTS[2], TEXTS[0]])
    assert (encoder.hits - hits, encoder.misses - misses) == (3, 0)
    np.testing.assert_array_equal(again, first[[2, 2, 0]])
    encoder.encode([TEXTS[3]])  # capacity 3: evicts the least recently used (TEXTS[1])
    misses = encoder.misses
    encoder.encode([TEXTS[1]])
    assert encoder.misses == misses + 1
    assert encoder.encode([]).shape == (0, 384)


def test_base_hidden_states_on_the_micro_zoo(micro_zoo):
    torch.set_num_threads(1)
    states = BaseHiddenStates(micro_zoo.layout.base, batch_size=2)
    out = states.encode(TEXTS[:4])
    assert out.shape == (4, micro_zoo.spec.model.hidden_size) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # padding must not change a text's vector: encode alone vs in a padded batch
    np.testing.assert_allclose(states._encode_batch([TEXTS[0]])[0], out[0], atol=1e-5)
    assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("precision,min_cosine", [("bf16", 0.999), ("int8", 0.9)])
def test_reduced_precision_stays_close_to_fp32(encoder, precision, min_cosine):
    fast = SentenceEncoder(precision=precision)
    cosine = (fast.encode(TEXTS) * encoder.encode(TEXTS)).sum(axis=1)
    assert cosine.min() >= min_cosine and cosine.max() < 1 - 1e-7  # close, and really a different model
    assert fast.reference[0].auto_model.dtype == torch.float32  # the library model was not converted in place


@pytest.mark.parametrize("faster", ["fp32", "bf16"])
def test_auto_precision_keeps_the_one_this_host_runs_faster(monkeypatch, faster):
    timed = []

    def probe(self, model):
        dtype = next(model.parameters()).dtype
        timed.append(dtype)
        return 0.01 if dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[faster] else 0.05

    monkeypatch.setattr(SentenceEncoder, "_probe_seconds", probe)
    enc = SentenceEncoder(precision="auto")
    assert enc.precision == faster and timed == [torch.float32, torch.bfloat16]
    assert next(enc.model.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[faster]


def test_the_auto_probe_times_real_forward_passes(encoder):
    assert 0 < encoder._probe_seconds(encoder.model) < 30


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision must be one of"):
        SentenceEncoder(precision="fp8")


def test_encode_from_many_threads_matches_sequential(encoder):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"Count the vowels of word{i}." for i in range(24)]
    encoder.clear_cache()
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda t: encoder.encode([t])[0], texts))
    encoder.clear_cache()
    np.testing.assert_allclose(np.stack(parallel), encoder.encode(texts), atol=2e-5)
