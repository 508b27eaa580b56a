"""Routing text: the user's words from chats and from prompts rendered with a chat template."""

import pytest

from deltaserve.router.text import ChatMarkup, route_text
from deltaserve_zoo.tokenizer import build_tokenizer

# SmolLM2-Instruct's ChatML template (tokenizer_config.json of HuggingFaceTB/SmolLM2-135M-Instruct).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def toy():
    return ChatMarkup.from_tokenizer(build_tokenizer())


@pytest.fixture(scope="module")
def chatml():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_markup_is_learnt_from_the_template(toy, chatml):
    assert toy == ChatMarkup("Q: ", ("\nA: ", "\nA:"))
    markup = ChatMarkup.from_tokenizer(chatml)
    assert markup.opener == "<|im_start|>user\n"
    assert "<|im_end|>" in markup.closers


@pytest.mark.parametrize("prompt,expected", [
    ("Q: Write abc backwards.\nA: ", "Write abc backwards."),
    ("Q: Reverse ab\nA: ba\nQ: Count the vowels of xyz.\nA:", "Count the vowels of xyz."),
    ("  plain text  ", "plain text"),
    ("Q: answered\nA: done", "answered"),
])
def test_toy_prompts(toy, prompt, expected):
    assert route_text(prompt=prompt, markup=toy) == expected


def test_real_chat_template_prompts(chatml):
    markup = ChatMarkup.from_tokenizer(chatml)
    one = chatml.apply_chat_template([{"role": "user", "content": "Convert 3 March 2021 to ISO format."}],
                                     add_generation_prompt=True, tokenize=False)
    assert one.startswith("<|im_start|>system\nYou are a helpful")
    assert route_text(prompt=one, markup=markup) == "Convert 3 March 2021 to ISO format."
    many = chatml.apply_chat_template(
        [{"role": "system", "content": "Be brief. user: ignore me"}, {"role": "user", "content": "first"},
         {"role": "assistant", "content": "ok"}, {"role": "user", "content": "What is 17 * 23?\nJust the number."}],
        add_generation_prompt=True, tokenize=False)
    assert route_text(prompt=many, markup=markup) == "What is 17 * 23?\nJust the number."
    # a prompt without the markup is routed as it is; a chat is routed on its last user message
    assert route_text(prompt="  What is 17 * 23?  ", markup=markup) == "What is 17 * 23?"
    assert route_text(messages=[{"role": "user", "content": one}]) == one.strip()


@pytest.mark.parametrize("kwargs,expected", [
    (dict(prompt=["first", "second"]), "second"),
    (dict(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
                    {"role": "assistant", "content": "x"}, {"role": "user", "content": " two "}]), "two"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "parts"},
                                                 {"type": "image_url", "image_url": {"url": "u"}}]}]), "parts"),
    (dict(messages=[{"role": "system", "content": "only system"}]), ""),
    (dict(), ""),
])
def test_route_text_shapes(kwargs, expected):
    assert route_text(**kwargs) == expected


def test_no_template_means_no_markup():
    tok = build_tokenizer()
    tok.chat_template = None
    assert ChatMarkup.from_tokenizer(tok) == ChatMarkup()
