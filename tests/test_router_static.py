"""router.static.StaticEncoder: the distilled token table, its cache, and routing on its features."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from deltaserve.router import Policy, RoutingService, make_router
from deltaserve.router.features import make_encoder
from deltaserve.router.static import STATIC_MAX_DISTANCE, STATIC_MIN_CONFIDENCE, StaticEncoder, load_or_distil

TEXTS = ["May 15 1977 -> ISO 8601?", "SELECT the rows where price > 10", "convert 5 miles to km", ""]


@pytest.fixture(scope="module")
def encoder(static_encoder_cache):
    return StaticEncoder(cache_dir=static_encoder_cache, cache_size=0)


def test_features_are_the_weighted_mean_of_the_prompt_tokens_rows(encoder):
    """The definition, written out: log(1 + id)-weighted mean of the distilled rows, L2-normalised."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(encoder.model_dir)
    table = encoder.table.numpy()
    got = encoder.encode(TEXTS)
    assert got.shape == (4, 384) and got.dtype == np.float32 and encoder.table.shape == (tok.vocab_size, 384)
    for text, row in zip(TEXTS[:3], got):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want = np.average(table[ids], axis=0, weights=np.log1p(ids))
        np.testing.assert_allclose(row, want / np.linalg.norm(want), atol=1e-5)
    assert np.all(got[3] == 0)   # no tokens: no direction (cosine distance 1 to everything: out of distribution)
    one_by_one = np.vstack([encoder.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(one_by_one, got, atol=1e-6)


def test_the_table_is_each_token_alone_through_minilm(encoder):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(encoder.model_dir), device="cpu")
    tok = st.tokenizer
    for token in ("date", "select", "##ing", "[UNK]"):
        i = tok.convert_tokens_to_ids(token)
        ids = torch.tensor([[tok.cls_token_id, i, tok.sep_token_id]])
        with torch.inference_mode():
            hidden = st[0].auto_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        torch.testing.assert_close(encoder.table[i], hidden[0].mean(0), atol=1e-4, rtol=1e-4)


def test_a_cached_table_is_loaded_not_distilled_again(static_encoder_cache, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("distilled although the cache holds a matching table")

    monkeypatch.setattr("deltaserve.router.static.distil_table", refuse)
    assert StaticEncoder(cache_dir=static_encoder_cache).dim == 384


def test_a_tampered_or_torn_cache_is_distilled_again(static_encoder_cache, tmp_path, monkeypatch, caplog):
    """Only a table whose digests match is served; anything else is rebuilt (here by a stand-in distiller)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    (path,) = static_encoder_cache.glob("minilm-static-*.safetensors")
    with safe_open(str(path), "pt") as fh:
        meta, table = fh.metadata(), fh.get_tensor("table")
    calls = []

    def stand_in(model, tokenizer, batch=1024):
        calls.append(1)
        return torch.ones(3, 384)

    monkeypatch.setattr("deltaserve.router.static.distil_table", stand_in)
    model_dir = StaticEncoder(cache_dir=static_encoder_cache).model_dir
    target = tmp_path / path.name
    edited = table.clone()
    edited[7, 0] += 1.0                                           # one value changed, digests kept
    save_file({"table": edited}, str(target), metadata=meta)
    with caplog.at_level(logging.WARNING, "deltaserve.router.static"):
        assert torch.equal(load_or_distil(model_dir, tmp_path), torch.ones(3, 384))
    assert "does not match" in caplog.text and len(calls) == 1
    assert torch.equal(load_or_distil(model_dir, tmp_path), torch.ones(3, 384)) and len(calls) == 1   # re-cached
    target.write_bytes(target.read_bytes()[:1000])                # torn
    assert torch.equal(load_or_distil(model_dir, tmp_path), torch.ones(3, 384)) and len(calls) == 2


def test_an_unwritable_cache_still_serves_from_memory(static_encoder_cache, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("deltaserve.router.static.distil_table", lambda *a, **k: torch.zeros(2, 384))

    def read_only(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("deltaserve.experts.atomic.write_bytes_atomic", read_only)
    model_dir = StaticEncoder(cache_dir=static_encoder_cache).model_dir
    with caplog.at_level(logging.WARNING, "deltaserve.router.static"):
        assert load_or_distil(model_dir, tmp_path / "ro").shape == (2, 384)
    assert "could not cache" in caplog.text and "Permission denied" in caplog.text


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    from deltaserve.router.static import default_cache_dir

    monkeypatch.setenv("DELTASERVE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DELTASERVE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "deltaserve"


def test_make_encoder_names_the_servers_encoders(static_encoder_cache):
    assert isinstance(make_encoder("static", cache_dir=static_encoder_cache), StaticEncoder)
    with pytest.raises(ValueError, match="unknown encoder 'bert'.*minilm.*static"):
        make_encoder("bert")


def test_the_gate_on_static_features_routes_the_real_suites_held_out_questions(encoder):
    """The real suite's six skills: 32 calib exemplars each, 32 held-out-phrasing test questions each."""
    from deltaserve_zoo.real.skills import get_skill
    from deltaserve_zoo.real.spec import RealSuiteSpec

    exemplars, queries = {}, []
    for name in RealSuiteSpec().skills:
        skill = get_skill(name)
        exemplars[name] = [e.messages[-1][1] for e in skill.examples("calib", 32, seed=11)]
        queries += [(e.messages[-1][1], name) for e in skill.examples("test", 32, seed=5, phrasings="heldout")]
    service = RoutingService(make_router("gate", encoder=encoder),
                             Policy(max_distance=STATIC_MAX_DISTANCE, min_confidence=STATIC_MIN_CONFIDENCE))
    service.set_exemplars(exemplars)
    decisions = service.route([q for q, _ in queries])
    right = sum(d.recipe == {want: 1.0} for d, (_, want) in zip(decisions, queries))
    assert right / len(queries) >= 0.95, json.dumps([d.to_json() for d in decisions[:3]])
    assert service.route_one("").fallback == "out_of_distribution"


def test_the_server_flag_and_setting_choose_the_encoder():
    import argparse

    from pydantic import ValidationError

    from deltaserve.server.commands import serve
    from deltaserve.server.settings import RouterSettings

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    need = ["--base", "b", "--store", "s"]
    assert serve.settings(parser.parse_args(need)).router.encoder == "minilm"
    assert serve.settings(parser.parse_args([*need, "--router-encoder", "static"])).router.encoder == "static"
    assert RouterSettings(name="gate", encoder="static").encoder == "static"
    with pytest.raises(ValidationError, match="'minilm' or 'static'"):
        RouterSettings(name="gate", encoder="bert")
