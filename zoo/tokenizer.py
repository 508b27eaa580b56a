"""Character-level (byte-level) HF fast tokenizer for the zoo models.

Every byte is one token (a BPE with no merges over the GPT-2 byte alphabet),
so ASCII text is tokenised one character per token and any UTF-8 text
round-trips exactly. A chat template renders a conversation in the same
``Q: … / A: …`` format the zoo tasks are trained on, so chat requests and
plain completions see identical tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# Prompt format shared by training, evaluation and the chat template.
QUESTION_PREFIX = "Q: "
ANSWER_PREFIX = "\nA: "

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Q: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '\\nA: ' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nA: ' }}{% endif %}"
)


def format_prompt(question: str) -> str:
    """The text a model sees for one question (without BOS); the answer follows."""
    return f"{QUESTION_PREFIX}{question}{ANSWER_PREFIX}"


def build_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer: ids 0-3 special, then the 256 bytes."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(byte_chars)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    bos_id = vocab[BOS]
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    table = _unicode_to_byte()
    return table[ch]


def _unicode_to_byte() -> dict[str, int]:
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}
