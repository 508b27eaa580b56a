"""knn and gate routers on zoo prompts with the real sentence encoder."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from deltaserve.router import Policy, RoutingService, make_router
from deltaserve_zoo.exemplars import SEEN_PHRASINGS, UNSEEN_PHRASINGS, ZOO_TASKS, zoo_exemplars, zoo_prompts
from deltaserve.router.features import SentenceEncoder
from deltaserve.router.knn import neighbour_votes

# Not the calibration texts (OOD_TEXTS of `python -m bench.routing.calibrate`): fresh prose for the OOD check.
PROSE = [
    "Our flight to Lisbon was delayed by three hours because of fog.",
    "Why do cats purr when they are happy?",
    "Draft a polite reminder that the rent is due on Friday.",
    "The novel follows two sisters growing up on a farm in Iowa.",
    "What's a good recipe for vegetable soup?",
    "The server returned a 500 error after the deploy.",
    "List three tips for a successful job interview.",
    "Photosynthesis converts light energy into chemical energy.",
]


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(1)
    return SentenceEncoder()


@pytest.fixture(scope="module")
def exemplars():
    return zoo_exemplars(ZOO_TASKS, 40)


@pytest.fixture(scope="module")
def prompts():
    return zoo_prompts(ZOO_TASKS, 40)


def test_exemplars_use_only_seen_phrasings_and_calib_payloads(exemplars, prompts):
    assert set(exemplars) == set(ZOO_TASKS) and all(len(v) == 40 for v in exemplars.values())
    assert not {p.text for p in prompts} & {t for v in exemplars.values() for t in v}
    assert {p.phrasing for p in prompts} == set(SEEN_PHRASINGS) | set(UNSEEN_PHRASINGS)
    assert set(UNSEEN_PHRASINGS) and not set(UNSEEN_PHRASINGS) & set(SEEN_PHRASINGS)


@pytest.mark.parametrize("name", ["knn", "gate"])
def test_routes_held_out_zoo_prompts(encoder, exemplars, prompts, name):
    router = make_router(name, encoder=encoder)
    router.fit(exemplars)
    decisions = RoutingService(router).route([p.text for p in prompts])  # default, calibrated policy
    correct = np.array([d.recipe == {p.task: 1.0} for d, p in zip(decisions, prompts)])
    unseen = np.array([not p.seen() for p in prompts])
    assert unseen.sum() > 20
    assert correct.mean() >= 0.95, f"{name}: accuracy {correct.mean():.3f}"
    assert correct[unseen].mean() >= 0.9, f"{name}: unseen-phrasing accuracy {correct[unseen].mean():.3f}"
    for d in decisions:
        assert d.router == name and d.distance is not None and 0 <= d.confidence <= 1
        assert abs(sum(d.scores.values()) - 1) < 1e-6 and min(d.scores.values()) >= 0


@pytest.mark.parametrize("name", ["knn", "gate"])
def test_prose_falls_back(encoder, exemplars, name):
    router = make_router(name, encoder=encoder)
    router.fit(exemplars)
    decisions = RoutingService(router, Policy(fallback={"safe": 1.0})).route(PROSE)
    assert [d.fallback for d in decisions] == ["out_of_distribution"] * len(PROSE)
    assert all(d.recipe == {"safe": 1.0} for d in decisions)


@pytest.mark.parametrize("name", ["knn", "gate"])
def test_add_and_remove_change_routing_immediately(encoder, exemplars, name):
    router = make_router(name, encoder=encoder)
    router.fit({t: exemplars[t] for t in ("upper", "length")})
    service = RoutingService(router)
    question = "What is the largest digit in 48213?"
    assert service.route_one(question).recipe != {"max_digit": 1.0}
    service.add("max_digit", exemplars["max_digit"])
    assert service.experts == ("length", "max_digit", "upper")
    assert service.route_one(question).recipe == {"max_digit": 1.0}
    service.remove("max_digit")
    assert "max_digit" not in service.route_one(question).scores
    service.remove("upper")
    service.remove("length")
    only = service.route_one(question)
    assert (only.recipe, only.fallback, only.scores) == ({}, "no_experts", {})


def test_fit_drops_experts_without_exemplars(encoder, exemplars):
    router = make_router("knn", encoder=encoder)
    router.fit({"upper": exemplars["upper"], "empty": []})
    assert router.experts == ("upper",)


def test_top_k_recipe_mixes_experts_on_the_grid(encoder, exemplars):
    router = make_router("gate", encoder=encoder)
    router.fit(exemplars)
    service = RoutingService(router, Policy(top_k=2, grid=0.25, min_confidence=0, max_distance=None))
    for d in service.route(["How many vowels and consonants are in banana?", "Count the vowels of abc."]):
        assert 1 <= len(d.recipe) <= 2 and abs(sum(d.recipe.values()) - 1) < 1e-9
        assert all(w in (0.25, 0.5, 0.75, 1.0) for w in d.recipe.values())


def test_neighbour_votes_against_a_loop():
    rng = np.random.default_rng(0)
    distances = np.sort(rng.uniform(0, 1, (5, 7)), axis=1)
    labels = rng.integers(0, 3, (5, 7))
    votes = neighbour_votes(distances, labels, 3, temperature=0.2)
    for row in range(5):
        expected = np.zeros(3)
        for d, label in zip(distances[row], labels[row]):
            expected[label] += np.exp(-d / 0.2)
        np.testing.assert_allclose(votes[row], expected / expected.sum(), rtol=1e-12)


class RandomEncoder:
    """Deterministic unit vectors per text: scale tests without model cost."""

    dim = 384

    def encode(self, texts):
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_knn_stays_fast_at_thousands_of_exemplars():
    router = make_router("knn", encoder=RandomEncoder())
    router.fit({f"e{i}": [f"e{i} text {j}" for j in range(20)] for i in range(250)})  # 5000 exemplars
    router.score(["warm up"])
    started = time.perf_counter()
    for i in range(20):
        router.score([f"query {i}"])
    per_call_s = (time.perf_counter() - started) / 20
    assert per_call_s < 0.02, f"{per_call_s * 1e3:.1f} ms per query at 5000 exemplars"


@pytest.mark.parametrize("n_exemplars,k", [(1, 10), (7, 3), (300, 10), (300, 1)])
def test_cosine_index_matches_sklearn(n_exemplars, k):
    from sklearn.neighbors import NearestNeighbors

    from deltaserve.router.index import CosineIndex, Snapshot

    rng = np.random.default_rng(n_exemplars)
    features = rng.standard_normal((n_exemplars, 16)).astype(np.float32) * rng.uniform(0.5, 2, (n_exemplars, 1))
    labels = rng.integers(0, 4, n_exemplars)
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    index = CosineIndex(Snapshot(("a", "b", "c", "d"), features, labels), k)
    distances, got_labels = index.query(queries)
    reference = NearestNeighbors(n_neighbors=min(k, n_exemplars), metric="cosine", algorithm="brute").fit(features)
    ref_distances, ref_rows = reference.kneighbors(queries)
    np.testing.assert_allclose(distances, ref_distances, atol=1e-5)
    np.testing.assert_array_equal(got_labels, labels[ref_rows])


def test_refitting_a_large_store_encodes_only_what_changed():
    """One registration in a store of 2,000 experts encodes that expert's exemplars, not every expert's again;
    the router's answers are those of a fresh fit."""

    class Counting(RandomEncoder):
        encoded = 0

        def encode(self, texts):
            self.encoded += len(texts)
            return super().encode(texts)

    encoder = Counting()
    exemplars = {f"e{i}": [f"e{i} text {j}" for j in range(2)] for i in range(2000)}
    router = make_router("knn", encoder=encoder)
    router.fit(exemplars)
    assert encoder.encoded == 4000
    changed = {**exemplars, "new": ["a new skill", "another"], "e7": ["e7 rewritten"]}
    del changed["e9"]
    router.fit(changed)
    assert encoder.encoded == 4000 + 3
    fresh = make_router("knn", encoder=RandomEncoder())
    fresh.fit(changed)
    queries = ["a new skill", "e7 rewritten", "e9 text 0", "e1 text 1"]
    assert router.experts == fresh.experts
    for (scores, distance), (want, want_distance) in zip(router.score(queries), fresh.score(queries)):
        assert scores == pytest.approx(want) and distance == pytest.approx(want_distance)


def test_a_new_router_reads_exemplar_features_from_disk(tmp_path):
    """A replica restarting on a large store reads its exemplars' features (router.index.FeatureCache) instead of
    encoding them again; changed texts are encoded, a corrupt file is encoded again, answers are a fresh fit's."""

    class Counting(RandomEncoder):
        identity = "random-384"
        encoded = 0

        def encode(self, texts):
            self.encoded += len(texts)
            return super().encode(texts)

    exemplars = {f"e{i}": [f"e{i} text {j}" for j in range(2)] for i in range(300)}
    first = make_router("knn", encoder=Counting())
    first.keep_features(tmp_path)
    first.fit(exemplars)
    files = sorted((tmp_path / "random-384").glob("*.safetensors"))
    assert first.encoder.encoded == 600 and len(files) == 300
    files[0].write_bytes(b"not safetensors")
    again = make_router("knn", encoder=Counting())
    again.keep_features(tmp_path)
    again.fit({**exemplars, "e5": ["e5 rewritten"]})
    assert again.encoder.encoded == 2 + 1   # the corrupt file's two texts and the rewritten one
    fresh = make_router("knn", encoder=RandomEncoder())
    fresh.fit({**exemplars, "e5": ["e5 rewritten"]})
    queries = ["e5 rewritten", "e9 text 0", "e1 text 1"]
    for (scores, distance), (want, want_distance) in zip(again.score(queries), fresh.score(queries)):
        assert scores == pytest.approx(want) and distance == pytest.approx(want_distance)
    unnamed = make_router("knn", encoder=RandomEncoder())   # an encoder with no identity keeps nothing on disk
    unnamed.keep_features(tmp_path / "other")
    unnamed.fit(exemplars)
    assert not (tmp_path / "other").exists()


def test_feature_files_no_expert_uses_are_pruned_once_old(tmp_path):
    """router.index.FeatureCache.prune: files of deleted or re-described experts go once older than the grace
    period (another replica may have just written one); current experts' files stay."""
    import os
    import time

    class Named(RandomEncoder):
        identity = "random-384"

    router = make_router("knn", encoder=Named())
    router.keep_features(tmp_path)
    router.fit({"a": ["a text"], "b": ["b text"], "c": ["c text"]})
    router.fit({"a": ["a text"], "b": ["b rewritten"]})   # c deleted, b re-described
    folder = tmp_path / "random-384"
    assert len(list(folder.glob("*.safetensors"))) == 4
    assert router.prune_features() == 0                      # all younger than an hour
    old = time.time() - 7200
    for path in folder.glob("*.safetensors"):
        os.utime(path, (old, old))
    assert router.prune_features() == 2
    assert len(list(folder.glob("*.safetensors"))) == 2
    again = make_router("knn", encoder=Named())
    again.keep_features(tmp_path)
    again.fit({"a": ["a text"], "b": ["b rewritten"]})      # both read from disk: answers as before
    assert again.score(["a text"])[0][0] == pytest.approx(router.score(["a text"])[0][0])
