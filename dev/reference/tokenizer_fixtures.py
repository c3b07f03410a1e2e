#!/usr/bin/env python3
"""Write the tokenizer and chat-template fixtures for tests/data/test_bpe_tokenizer.cpp and
tests/data/test_chat_template.cpp.

Three small byte-level BPE tokenizers (vocab ~900) are trained with the Hugging Face `tokenizers` library,
each configured the way a real model family writes its tokenizer.json:
  * gpt2    ByteLevel pre-tokenizer with its built-in regex (use_regex), ByteLevel decoder, special token
            <|endoftext|>, merges saved in the legacy "a b" string form, plus added tokens that exercise
            lstrip/rstrip and a normalized non-special added token.
  * llama3  Sequence[Split(Llama-3 regex, Isolated), ByteLevel(use_regex=false)], model.ignore_merges=true,
            the <|begin_of_text|> family of special tokens, merges saved as ["a","b"] pairs.
  * qwen2   NFC normalizer, Sequence[Split(Qwen2 regex, Isolated), ByteLevel(use_regex=false)], the ChatML
            special tokens and non-special added tokens (<tool_call>, <think>, ...).
The ids of every line of a test corpus (training lines and held-out lines, special tokens inside text,
whitespace runs, NFC-sensitive text) are recorded with the decoded text, so the C++ side can match every
id and check decode(encode(x)).

The chat-template fixture renders conversations with transformers' apply_chat_template. The Jinja templates
below are written here to reproduce the published behaviour of each family (ChatML as in Qwen2.5 with its
default system prompt, plain ChatML, Llama-3-Instruct, the tool-free part of Llama-3.1/3.3-Instruct and of
Llama-3.2-Instruct (whose date comes from strftime_now), Qwen3 with enable_thinking); they keep the distinctive
substrings by which the C++ side recognises a template ("<|im_start|>", "<|start_header_id|>", "<|eot_id|>",
"Cutting Knowledge Date", "strftime_now", "enable_thinking"). The Llama-3.2 template is rendered with
date_string="26 Jul 2024" (its fallback), since transformers' strftime_now would write the day of the run.

Usage (needs tokenizers and transformers):
    python3 dev/reference/tokenizer_fixtures.py   # writes tests/fixtures/tokenizers/
"""

import json
import os
import random
import sys
import unicodedata

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizers")

# The pre-tokenizer patterns of the real tokenizer.json files (Split pre-tokenizer, behavior Isolated).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

VOCAB_SIZE = 900

# ---------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------

HANDWRITTEN_TRAIN = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a small tokenizer, but it's ours: we've trained it, they'll test it and you'd better trust it.",
    "I'm sure he's right; we're not done, aren't we? DON'T PANIC, SHE'LL BE FINE.",
    "Numbers: 0 7 42 365 2024 1000000 3.14159 -17 +8 1e-9 0x1F 12,345.67",
    "Prices went from $19.99 to €24,50 (a 22.6% rise) on 2024-03-15 at 09:30.",
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += v[i] * w[i];\n}\n",
    "if x != None and y >= 3:\n        print(f\"{x=} {y!r}\")  # debug\n",
    "<html><body><p class=\"note\">Hello &amp; welcome</p></body></html>",
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name;",
    "    leading spaces, trailing spaces    ",
    "tabs\there\tand\tthere\t\tdouble",
    "line one\nline two\n\nline four after a blank\n\n\n\nmany newlines",
    "windows\r\nline\r\nendings\r\n",
    "我们在训练一个很小的分词器。今天天气很好，我们去公园散步吧！",
    "東京は日本の首都です。ひらがなとカタカナも使います。",
    "한국어 문장도 조금 넣어 봅시다. 안녕하세요!",
    "مرحبا بالعالم، هذه جملة باللغة العربية للاختبار.",
    "Привет, мир! Это предложение на русском языке.",
    "Ελληνικά: γεια σου κόσμε.",
    "हिन्दी में एक वाक्य यहाँ है।",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "Emoji: 😀 😃 🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ ✨",
    "Café, naïve, résumé, façade, jalapeño, Ångström, Zürich.",
    "Special tokens appear in text: <|endoftext|> and <|im_start|>user\nhi<|im_end|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>",
    "Mixed 中文 and English and العربية and 日本語 in 1 line with 3 numbers 456.",
    "a   b    c     d      e",
    "!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "https://example.com/path?query=1&other=two#frag and user@example.org",
    "JSON: {\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
]

WORDS = ("the of and to in is was for on that with as by at from it this be are or an which not but have had "
         "they you one all were we can there their been has more when will would who if so no out up into "
         "model token training data loss gradient layer attention weight batch learning rate step value "
         "text word number file code function return class string list index vector matrix").split()
CJK = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后"
ARABIC = "في من على إلى أن هذا كان التي الذي هو مع كل عن بين بعد".split()


def generated_lines(count, seed):
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        kind = rng.randrange(6)
        if kind <= 2:
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.3:
                words[0] = words[0].capitalize()
            line = " ".join(words) + rng.choice([".", "!", "?", ",", ";", ""])
        elif kind == 3:
            line = "".join(rng.choice(CJK) for _ in range(rng.randint(5, 20))) + rng.choice(["。", "，", "！"])
        elif kind == 4:
            line = " ".join(rng.choice(ARABIC) for _ in range(rng.randint(3, 9)))
        else:
            name = rng.choice(WORDS)
            line = f"    {name}_{rng.randint(0, 99)} = {rng.choice(WORDS)}({rng.randint(0, 9999)}, {name})"
        lines.append(line)
    return lines


# Held-out lines: never seen in training, chosen to hit the edge cases of each pre-tokenizer.
HELD_OUT = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t\t \n \n",
    "Hello world",
    " Hello world",
    "Hello  world   again    ",
    "   indented\n      code\n",
    "trailing newline\n",
    "They'RE here, it'S fine, we'VE won, I'D say, you'LL see, isn'T it, I'M in.",
    "Don’t use curly apostrophes’s.",
    "123456789 and 12345 and 1 and 12 and 1234",
    "١٢٣ Arabic-Indic digits and ½ ⅓ Ⅻ number-likes",
    "tokenization_is_fun(with_underscores_and_CamelCase)",
    "x=1;y=2;z=x+y*3/4-5%6",
    "\"quoted\" 'single' `backtick`",
    "中文句子没有空格而且很长很长很长很长很长很长很长很长很长很长很长很长。",
    "日本語とEnglishの混在テキスト123です",
    "السلام عليكم ورحمة الله",
    "😀😀😀 🚀 rocket 🏳️‍🌈 flag",
    "combining: e\u0301 a\u0308 o\u0302 n\u0303 (decomposed) vs é ä ô ñ (composed)",
    "Hangul jamo: \u1112\u1161\u11ab\u1100\u1173\u11af and syllables: 한글",
    "ordering: a\u0323\u0307 a\u0307\u0323 q\u0307\u0323",
    "Ångström sign \u212b and Ohm sign \u2126 and Kelvin \u212a",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>",
    "text before<|endoftext|>text after",
    "spaces around   <|endoftext|>   special",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "almost special <|endoftext| and <|im_start and |im_end|>",
    "<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\nSure.<|eot_id|>",
    "some <mask> here and <mask>there and [SEP]   next",
    "the foo_bar token and foo_barbaz",
    "<think>\nreasoning\n</think>\n\nanswer <tool_call>{\"name\": \"f\"}</tool_call>",
    "cafe\u0301_token and café_token",
    "no-break\u00a0space, em\u2003space, ideographic\u3000space, NEL\u0085here",
    "zero\u200bwidth and soft\u00adhyphen",
    "x\u0085\u0085 y \u0085\nz \u0085",
    "a\r\nb\rc\n\rd",
    "ALL CAPS SENTENCE WITH NUMBERS 2025 AND SYMBOLS #@!",
    "      ",
    "end with spaces and newline  \n",
    "x" * 300,
    " ".join(["supercalifragilisticexpialidocious"] * 5),
]

# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


def train(tokenizer, lines):
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(lines, trainer=trainer)


def make_gpt2(lines):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    train(tok, lines)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False),
                            AddedToken("<mask>", special=True, lstrip=True, normalized=False),
                            AddedToken("[SEP]", special=True, rstrip=True, normalized=False)])
    tok.add_tokens([AddedToken("foo_bar", special=False, normalized=True)])
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"}
    return tok, config


def make_llama3(lines):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    train(tok, lines)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|reserved_special_token_2|>", "<|eot_id|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "model_max_length": 8192,
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLAMA3_TEMPLATE}
    return tok, config


def make_qwen2(lines):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    train(tok, lines)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    tok.add_tokens([AddedToken(s, special=False, normalized=False)
                    for s in ["<tool_call>", "</tool_call>", "<think>", "</think>"]])
    # A normalized added token with a precomposed letter: it must match decomposed text after NFC.
    tok.add_tokens([AddedToken("café_token", special=False, normalized=True)])
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer", "chat_template": QWEN25_TEMPLATE}
    return tok, config


def legacy_merges(tokenizer_json):
    """Rewrite merges from [["a","b"], ...] pairs to the older "a b" strings (both forms exist on the Hub)."""
    data = json.loads(tokenizer_json)
    merges = data["model"]["merges"]
    if merges and isinstance(merges[0], list):
        for a, b in merges:
            assert " " not in a and " " not in b
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(data, ensure_ascii=False, indent=2)


def pair_merges(tokenizer_json):
    data = json.loads(tokenizer_json)
    merges = data["model"]["merges"]
    if merges and isinstance(merges[0], str):
        data["model"]["merges"] = [m.split(" ", 1) for m in merges]
    return json.dumps(data, ensure_ascii=False, indent=2)


# ---------------------------------------------------------------------------------------------------------
# Chat templates (written here; see the module docstring)
# ---------------------------------------------------------------------------------------------------------

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (loop.first and message['role'] == 'system') %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

LLAMA3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first %}{{- bos_token }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

# Llama-3.1/3.3-Instruct without tools: the system header always comes first, with the knowledge cutoff and
# the date, then the (trimmed) system message; every other message is trimmed as in Llama-3.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")

# Llama-3.2-Instruct: the same, with the date from strftime_now when the renderer defines it.
LLAMA32_TEMPLATE = LLAMA31_TEMPLATE.replace(
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n",
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n")

# Qwen3: a leading system message; the index of the last real user query; assistant turns after it keep
# (or get an empty) <think> block, earlier ones lose their reasoning; the generation prompt gets an empty
# think block when enable_thinking is false.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set state = namespace(last_user=messages|length - 1, searching=true) %}\n"
    "{%- for i in range(messages|length - 1, -1, -1) %}\n"
    "    {%- set m = messages[i] %}\n"
    "    {%- if state.searching and m.role == 'user' and not (m.content.startswith('<tool_response>')"
    " and m.content.endswith('</tool_response>')) %}\n"
    "        {%- set state.searching = false %}\n"
    "        {%- set state.last_user = i %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- set content = message.content %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {%- set reasoning = '' %}\n"
    "        {%- if '</think>' in content %}\n"
    "            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > state.last_user and (loop.last or reasoning) %}\n"
    "            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>assistant\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n")


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


CONVERSATIONS = [
    [u("Hello!")],
    [u("What is 2+2?"), a("4.")],
    [s("You are terse."), u("Name a colour."), a("Blue."), u("Another?"), a("Green.")],
    [u("Translate 'cat' to French."), a("Chat."), u("And to German?")],
    [s("Be kind."), u("Hi"), a("Hello! How can I help?"), s("New instruction: answer in Chinese."),
     u("What is a tokenizer?"), a("分词器把文本切成词元。")],
    [u("  padded question  \n"), a("\n  padded answer  \n")],
    [u("Solve it."), a("<think>\nLet me think.\n</think>\n\nThe answer is 7."), u("Why?"),
     a("<think>Because 3+4.</think>Because 3 + 4 = 7.")],
    [u("Only a thought."), a("<think>\n\nhmm\n\n</think>\n\nDone.")],
    [u("Multi\nline\n\ninput"), a("Multi\nline\n\noutput")],
]

TEMPLATES = {
    "qwen2.5": {"template": QWEN25_TEMPLATE, "tokenizer": "qwen2", "bos_token": None},
    "chatml": {"template": CHATML_TEMPLATE, "tokenizer": "qwen2", "bos_token": None},
    "llama3": {"template": LLAMA3_TEMPLATE, "tokenizer": "llama3", "bos_token": "<|begin_of_text|>"},
    "llama3.1": {"template": LLAMA31_TEMPLATE, "tokenizer": "llama3", "bos_token": "<|begin_of_text|>"},
    "llama3.2": {"template": LLAMA32_TEMPLATE, "tokenizer": "llama3", "bos_token": "<|begin_of_text|>",
                 "extra": {"date_string": "26 Jul 2024"}},
    "qwen3": {"template": QWEN3_TEMPLATE, "tokenizer": "qwen2", "bos_token": None},
}


def chat_fixture(tokenizers_by_name):
    from transformers import PreTrainedTokenizerFast

    out = []
    for name, spec in TEMPLATES.items():
        tok = tokenizers_by_name[spec["tokenizer"]]
        kwargs = {"tokenizer_object": tok, "chat_template": spec["template"]}
        if spec["bos_token"]:
            kwargs["bos_token"] = spec["bos_token"]
        hf = PreTrainedTokenizerFast(**kwargs)
        cases = []
        for messages in CONVERSATIONS:
            for gen in (False, True):
                if gen and messages[-1]["role"] == "assistant":
                    continue
                thinking_options = [False, True] if name == "qwen3" else [None]
                for thinking in thinking_options:
                    extra = dict(spec.get("extra", {}))
                    if thinking is not None:
                        extra["enable_thinking"] = thinking
                    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **extra)
                    ids = tok.encode(text, add_special_tokens=False).ids
                    case = {"messages": messages, "add_generation_prompt": gen, "text": text, "ids": ids}
                    if thinking is not None:
                        case["enable_thinking"] = thinking
                    cases.append(case)
        out.append({"name": name, "tokenizer": spec["tokenizer"], "chat_template": spec["template"],
                    "bos_token": spec["bos_token"], "cases": cases})
    return out


# ---------------------------------------------------------------------------------------------------------


def nfc_cases(count, seed):
    """Random strings over characters that interact under NFC, with their NFC (external truth for NFC)."""
    rng = random.Random(seed)
    pool = ("aeiouAEOnNcCsSkKq" + "\u0300\u0301\u0302\u0303\u0308\u030a\u030c\u0323\u0327\u0328\u031b"
            "\u0345\u0344\u0340\u0374\u037e\u0387\u212b\u2126\u212a\u00c5\u00e9\u1e69\u1e63\u01d5"
            "\u0915\u093c\u0958\u09c7\u09be\u0b47\u0b3e\u0f73\u0f71\u0f72\u0f74\u05b0\u05b8\u05d0"
            "\u1100\u1161\u11a8\u1112\u1175\u11c2\uac00\uac01\ud55c\u3099\u304b\u309a\u30cf"
            "\U0001d15e\U0001d165\U0001d160\U00011099\U000110ba\u2add\u0338\u226e\u003c\ufb1d\uf900")
    cases = []
    for _ in range(count):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 8)))
        cases.append({"text": text, "nfc": unicodedata.normalize("NFC", text)})
    return cases


def tiny_ignore_merges():
    """A hand-made vocabulary where ignore_merges changes the result: "abc" is a token, but merging "abc"
    applies "b c" first and then has no merge for ("a", "bc")."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in ["ab", "bc", "abc", "Ġa", "Ġab"]:
        vocab[token] = len(vocab)
    merges = [("b", "c"), ("a", "b"), ("Ġ", "a"), ("Ġa", "b")]
    out = {}
    for ignore in (False, True):
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        texts = ["abc", " abc", "abcabc", "ab", "bc abc ab"]
        out["ignore" if ignore else "merge"] = {
            "tokenizer_json": tok.to_str(),
            "cases": [{"text": t, "ids": tok.encode(t).ids} for t in texts],
        }
    return out


def expected_cases(tok, lines):
    cases = []
    for text in lines:
        enc = tok.encode(text, add_special_tokens=False)
        cases.append({
            "text": text,
            "ids": enc.ids,
            "decoded": tok.decode(enc.ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(enc.ids, skip_special_tokens=True),
        })
    return cases


def main():
    train_lines = HANDWRITTEN_TRAIN + generated_lines(400, seed=1)
    test_lines = HANDWRITTEN_TRAIN + generated_lines(20, seed=2) + HELD_OUT
    os.makedirs(OUT, exist_ok=True)

    built = {}
    for name, maker, merges_form in [("gpt2", make_gpt2, legacy_merges), ("llama3", make_llama3, pair_merges),
                                     ("qwen2", make_qwen2, pair_merges)]:
        tok, config = maker(train_lines)
        text = merges_form(tok.to_str())
        reloaded = Tokenizer.from_str(text)
        for line in test_lines:
            assert reloaded.encode(line).ids == tok.encode(line).ids, (name, line)
        folder = os.path.join(OUT, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
            f.write("\n")
        built[name] = reloaded

    expected = {"generator": "dev/reference/tokenizer_fixtures.py", "unicode_version": unicodedata.unidata_version,
                "tokenizers": {}}
    for name, tok in built.items():
        expected["tokenizers"][name] = {"cases": expected_cases(tok, test_lines),
                                        "vocab_size": tok.get_vocab_size(with_added_tokens=True)}

    # Variants built by editing the stored tokenizer.json the same way the C++ test does.
    variants = {}
    gpt2 = json.loads(open(os.path.join(OUT, "gpt2", "tokenizer.json"), encoding="utf-8").read())
    gpt2["pre_tokenizer"]["add_prefix_space"] = True
    prefix = Tokenizer.from_str(json.dumps(gpt2))
    variants["gpt2_add_prefix_space"] = expected_cases(prefix, test_lines)
    llama = json.loads(open(os.path.join(OUT, "llama3", "tokenizer.json"), encoding="utf-8").read())
    llama["model"]["ignore_merges"] = False
    no_ignore = Tokenizer.from_str(json.dumps(llama))
    variants["llama3_no_ignore_merges"] = expected_cases(no_ignore, test_lines)
    expected["variants"] = variants
    expected["tiny_ignore_merges"] = tiny_ignore_merges()
    expected["nfc"] = nfc_cases(400, seed=3)
    # Encoding with the post-processor (Llama-3 adds <|begin_of_text|>).
    expected["llama3_with_special"] = [{"text": t, "ids": built["llama3"].encode(t).ids} for t in test_lines[:3]]

    with open(os.path.join(OUT, "expected_ids.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False)
        f.write("\n")

    with open(os.path.join(OUT, "chat_templates.json"), "w", encoding="utf-8") as f:
        json.dump({"generator": "dev/reference/tokenizer_fixtures.py", "templates": chat_fixture(built)}, f,
                  ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
