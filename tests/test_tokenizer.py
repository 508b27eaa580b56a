import pytest

from deltaserve_zoo.tokenizer import SPECIAL_TOKENS, format_prompt


@pytest.fixture(scope="module")
def tok(zoo_tokenizer):
    return zoo_tokenizer


@pytest.mark.parametrize(
    "text",
    ["Reverse the letters: abc", "  leading and trailing  ", "tabs\tand\nnewlines\n", "héllo wörld 日本 🙂", ""],
)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_one_token_per_byte(tok):
    text = "Q: sort xyz\nA: "
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == [len(SPECIAL_TOKENS) + b for b in text.encode()]
    assert len(tok) == len(SPECIAL_TOKENS) + 256


def test_bos_added_and_special_tokens_skipped(tok):
    ids = tok("ab").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "ab"
    assert tok.decode(ids + [tok.eos_token_id]) == "<s>ab</s>"


def test_chat_template_matches_training_prompt(tok):
    messages = [{"role": "user", "content": "Write abc backwards."}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.bos_token + format_prompt("Write abc backwards.")


def test_chat_template_multi_turn(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>be brief\nQ: a\nA: b</s>\nQ: c\nA: "


def test_save_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Q: Mirror the string qwe\nA: "
    assert again(text).input_ids == tok(text).input_ids
    assert again.chat_template == tok.chat_template
    assert again.eos_token == "</s>" and again.pad_token == "<pad>"
