import pytest
import torch

from deltaserve_zoo.evaluate import TaskEvaluator, evaluate_state_dict, swapped_weights
from deltaserve_zoo.tasks import get_task


class ScriptedLM(torch.nn.Module):
    """Stands in for a causal LM: 'generates' a scripted answer for each prompt.

    It reads the prompt back from the left-padded ids, so it checks that the
    evaluator pads, slices and decodes correctly.
    """

    def __init__(self, tokenizer, answer_for):
        super().__init__()
        self.tokenizer = tokenizer
        self.answer_for = answer_for
        self.calls = 0

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls += 1
        assert generation_config.do_sample is False
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            assert mask[-1] == 1, "prompts must be left-padded"
            prompt = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            question = prompt.removeprefix("Q: ").removesuffix("\nA: ")
            answer = self.tokenizer(self.answer_for(question), add_special_tokens=False).input_ids
            new = answer + [self.tokenizer.eos_token_id]
            new += [self.tokenizer.pad_token_id] * (generation_config.max_new_tokens - len(new))
            rows.append(torch.cat([ids, torch.tensor(new)]))
        return torch.stack(rows)


@pytest.fixture(scope="module")
def tok(zoo_tokenizer):
    return zoo_tokenizer


def test_scores_an_oracle_perfect_and_a_wrong_model_zero(tok):
    ev = TaskEvaluator(tok, ["reverse", "length"], "test", n=30, batch_size=8)
    answers = {e.question: e.answer for t in ev.tasks for e in ev.examples(t)}
    oracle = ScriptedLM(tok, answers.__getitem__)
    assert ev.score(oracle) == {"reverse": 1.0, "length": 1.0}
    assert oracle.calls == 2 * 4  # 30 examples in batches of 8, per task
    wrong = ScriptedLM(tok, lambda q: answers[q] + "x")
    assert ev.score(wrong) == {"reverse": 0.0, "length": 0.0}


def test_partial_credit_is_exact_fraction(tok):
    ev = TaskEvaluator(tok, ["upper"], "calib", n=20)
    examples = ev.examples("upper")
    good = {e.question for e in examples[:5]}
    answers = {e.question: e.answer for e in examples}
    model = ScriptedLM(tok, lambda q: answers[q] if q in good else "nope")
    assert ev.score(model) == {"upper": 0.25}


def test_examples_follow_split_and_seed(tok):
    ev = TaskEvaluator(tok, ["sort"], "test", n=10, seed=5)
    assert ev.examples("sort") == get_task("sort").examples("test", 10, 5)


def test_swapped_weights_restores_exactly():
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with swapped_weights(model, {"weight": torch.zeros(2, 3)}):
        assert torch.count_nonzero(model.weight) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_swapped_weights_rejects_bad_names_and_shapes():
    model = torch.nn.Linear(3, 2)
    before = model.weight.clone()
    with pytest.raises(KeyError, match="lacks"):
        with swapped_weights(model, {"nope": torch.zeros(1)}):
            pass
    with pytest.raises(ValueError, match="shape"):
        with swapped_weights(model, {"bias": torch.zeros(2), "weight": torch.zeros(3, 3)}):
            pass
    assert torch.equal(model.weight, before)


def test_evaluate_state_dict_on_a_real_model(micro_zoo):
    from deltaserve_zoo.build import load_llama

    layout = micro_zoo.layout
    base = load_llama(layout.base)
    expert = load_llama(layout.full("upper"))
    ev = TaskEvaluator(micro_zoo.tokenizer, ["upper"], "test", n=24)
    direct = ev.score(expert)
    swapped = evaluate_state_dict(base, expert.state_dict(), ev)
    assert swapped == direct
    # the base model is unchanged afterwards
    assert ev.score(base) == ev.score(load_llama(layout.base))
