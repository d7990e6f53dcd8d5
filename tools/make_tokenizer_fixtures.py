#!/usr/bin/env python3
"""Writes the tokenizer parity fixtures under tests/fixtures/tokenizer/<style>/.

For each style: tokenizer.json (+ tokenizer_config.json with a chat template), cases.jsonl with
the ids that the `tokenizers` package gives for a few thousand varied strings (and what it
decodes them back to), and chat.jsonl with what transformers' apply_chat_template renders;
chat_templates.jsonl does the same for more ChatML variants (Qwen2's default system prompt, none,
an escaped one) with the SmolLM2 tokenizer.

Styles:
  smollm2          SmolLM2-135M-Instruct's own tokenizer.json (byte-level BPE, Digits, ChatML)
  llama2           trained here: Prepend/Replace normalizer, no pre-tokenizer, byte_fallback,
                   Replace+ByteFallback+Fuse+Strip decoder, "<s> $A" post-processor, [INST] template
  metaspace        the same model with a Metaspace(prepend_scheme=first, split) pre-tokenizer and
                   decoder, plus added tokens with lstrip / rstrip / single_word / normalized
  llama3           trained here: Split(Llama 3 regex) + ByteLevel(use_regex=false), ignore_merges,
                   Llama 3 chat template

Everything is seeded: running it twice writes the same files.
  python3 tools/make_tokenizer_fixtures.py [--smollm2 models/SmolLM2-135M-Instruct]
Needs: tokenizers>=0.20, transformers>=4.45 (tools/requirements-fixtures.txt).
"""
import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tokenizer"
N_CASES = 2200

# ---- text pools ------------------------------------------------------------------------------

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.", "Hello, world!", "I'm sure they'll agree.",
    "We've been waiting since 9am; it's 11:45 now.", "She'd've known, wouldn't she?",
    "DON'T SHOUT. IT'S RUDE.", "You're right, I'M wrong", "Speculative decoding drafts a tree of tokens.",
    "The target model verifies every branch in one forward pass.", "e.g. i.e. etc. vs. Mr. Smith",
    "Once upon a time, in a land far, far away...", "What's up? Nothing much.",
    "a b c d e f g", "antidisestablishmentarianism", "supercalifragilisticexpialidocious",
    "Tokenization is the first step of every language model pipeline.", "It costs $3.50 (or €3,20).",
    "Email me at someone@example.com or visit https://example.org/path?q=1&r=2#frag.",
    "    indented text", "trailing spaces   ", "CamelCaseIdentifiersAreCommon", "snake_case_identifier",
    "ALLCAPS and lowercase and MiXeD", "O'Neil's dog's bone", "rock 'n' roll", "'tis the season",
    "the year 1999 and 2024", "Version 3.14.159-rc2", "#hashtag @mention", "50% off!!!",
]

WORDS = ("time person year way day thing man world life hand part child eye woman place work week "
         "case point government company number group problem fact be have do say get make go know take "
         "see come think look want give use find tell ask seem feel try leave call good new first last "
         "long great little own other old right big high different small large next early young "
         "important few public bad same able token model cache tree draft verify accept commit kernel "
         "memory bandwidth attention prefix batch sequence").split()

MULTILINGUAL = [
    "你好，世界！", "我们今天去公园散步吧。", "机器学习是人工智能的一个分支。", "東京は日本の首都です。",
    "ひらがなとカタカナ、そして漢字。", "コンピューターサイエンス", "안녕하세요, 반갑습니다.", "한국어 문장을 토큰화합니다.",
    "مرحبا بالعالم", "اللغة العربية جميلة جداً.", "שלום עולם", "עברית נכתבת מימין לשמאל.",
    "नमस्ते दुनिया", "हिन्दी भाषा बहुत सुंदर है।", "สวัสดีครับ", "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "Привет, мир!", "Съешь же ещё этих мягких французских булок.", "Γειά σου Κόσμε", "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "Tiếng Việt có dấu: Đường phố Hà Nội.", "Grüße aus München, schöne Äpfel und Öl.", "Ça va? Très bien, merci.",
    "¿Dónde está la biblioteca? ¡Aquí!", "İstanbul'da ılık bir gün; ĞÜŞÖÇ", "வணக்கம் உலகம்", "হ্যালো বিশ্ব",
    "გამარჯობა მსოფლიო", "Բարեւ աշխարհ", "ሰላም ልዑል", "Ελληνικά και Ρωσικά: ёжик", "Zażółć gęślą jaźń.",
    "Þetta er íslenska.", "Å øl på én dag", "ﷺ ﷽", "ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ", "ｶﾀｶﾅ半角",
]

EMOJI = [
    "😀", "😂🤣", "👍", "👍🏽", "👍🏿", "👨‍👩‍👧‍👦", "👩‍💻", "🧑🏿‍🚀", "🏳️‍🌈", "🏴‍☠️", "🇺🇸", "🇯🇵🇫🇷🇩🇪",
    "❤️", "❤", "✨🎉🎊", "1️⃣2️⃣3️⃣", "#️⃣", "🐍🦀", "🙏🏻", "💯", "🤷‍♀️", "👁‍🗨", "🕵️‍♂️", "©®™",
]

CODE = [
    "int main(void) {\n    printf(\"hello\\n\");\n    return 0;\n}\n",
    "def f(x):\n\treturn x ** 2  # square\n",
    "for (let i = 0; i < n; i++) { sum += a[i]; }",
    "fn main() -> Result<(), Box<dyn Error>> {\n    let v: Vec<u32> = (0..10).collect();\n    Ok(())\n}",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "<div class=\"row\"><span id='x'>&nbsp;text&lt;</span></div>",
    "{\"key\": [1, 2.5, true, null], \"nested\": {\"a\": \"b\"}}",
    "$ ls -la | grep '\\.c$' && echo \"done\" > /dev/null 2>&1",
    "#include <stdio.h>\n#define MAX(a,b) ((a)>(b)?(a):(b))",
    "x = [i*i for i in range(10) if i % 2 == 0]",
    "public static void Main(string[] args) => Console.WriteLine(\"Hi\");",
    "if err != nil {\n\t\treturn fmt.Errorf(\"wrap: %w\", err)\n\t}",
    "    \"\"\"Docstring with 'quotes' and \\\"escapes\\\".\"\"\"",
    "a+=1;b-=2;c*=3;d/=4;e%=5;f<<=1;g>>=2;h&&=i||j",
    "// comment\n/* block\n   comment */\n",
    "\\begin{equation} E = mc^2 \\end{equation}",
]

WHITESPACE = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n", "\n ", " \t ",
              "\u00a0", "\u3000", "\u2028", "\u2003", " \u00a0 ", "\u000b", "\u000c", "\u0085", "        "]

NUMBERS = ["0", "7", "42", "123", "1234", "12345678901234567890", "3.14159", "1,000,000", "-273.15",
           "1e-9", "0x1F", "٣٤٥", "१२३", "²³", "½", "Ⅻ", "①②", "１２３", "2024-01-31", "12:30:45", "+1 (555) 010-9999"]

PUNCT = ["!", "!!!", "...", "…", "?!?!", "—", "–", "«»", "“quoted”", "‘single’", "()", "[]{}", "@#$%^&*",
         "~~~", "___", "---", "===", ";;", "::", "<>", "<<>>", "\\\\", "//", "||", "¡¿", "„“", "、。", "・"]

ODD = ["e\u0301", "n\u0303", "\u200b", "\u200d", "\ufeff", "a\ufe0f", "\u00ad", "\u0001", "\u007f", "\u001b[0m",
       "\u202e", "ﬁ", "Å", "Å", "ß", "ẞ", "ǅ", "ℌ", "𝓗𝓮𝓵𝓵𝓸", "𝟘𝟙𝟚", "\U0001F600\U0001F601", "\u0300", "\u180e",
       "ſ", "K", "'S", "'LL", "’s", "'s'", "''", "'"]

SPECIALS = {
    "smollm2": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "<|im_end|>\n", "<|im_start",
                "im_end|>", "<file_sep>", "<repo_name>", "<|im_start|><|im_end|>", "< |im_start|>"],
    "llama2": ["<s>", "</s>", "<unk>", " <s> ", "<s", "s>", "[INST]", "[/INST]", "<</s>>", "<s><s>"],
    "metaspace": ["<s>", "</s>", "<unk>", "<mask>", " <mask> ", "x<mask>y", "<sep>", "<sep>  x", "[WORD]",
                  "a[WORD]b", " [WORD] ", "<norm>", "▁<norm>", "[INST]", "</s><s>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
               "<|reserved_special_token_3|>", "<|begin_of_text", "<|eot_id|><|eot_id|>"],
}

POOLS = [("english", ENGLISH, 6), ("words", WORDS, 6), ("multi", MULTILINGUAL, 5), ("emoji", EMOJI, 3),
         ("code", CODE, 3), ("ws", WHITESPACE, 3), ("num", NUMBERS, 3), ("punct", PUNCT, 2), ("odd", ODD, 2),
         ("special", None, 2)]
SEPARATORS = ["", " ", " ", " ", "  ", "\n", "\t", "\r\n", " \n", "   ", "\n\n"]


def random_text(rng: random.Random, style: str) -> str:
    n = rng.choice([1, 1, 2, 2, 3, 3, 4, 5, 6, 8])
    parts = []
    for _ in range(n):
        name, pool, _ = rng.choices(POOLS, weights=[w for _, _, w in POOLS])[0]
        pool = SPECIALS[style] if pool is None else pool
        frag = rng.choice(pool)
        if name == "words":
            frag = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
            if rng.random() < 0.2:
                frag = frag.capitalize()
        parts.append(frag)
        parts.append(rng.choice(SEPARATORS))
    text = "".join(parts[:-1] if rng.random() < 0.7 else parts)
    if rng.random() < 0.05:
        text = " " + text
    return text


def fixed_cases(style: str) -> list:
    cases = ["", " ", "  ", "\n", "\t", "\r\n", "a", "A", "1", "12", "123", "1234", "12345",
             "hello", " hello", "  hello", "hello ", "hello  ", "hello\n", "\nhello", "hello world",
             "Hello World!", "a" * 300, "ab" * 150, " " * 40, "\n" * 10, "x " * 60, "9" * 100,
             "3.141592653589793238462643383279502884197169399375105820974944",
             "I'm", "I'M", "you've", "They'll", "it'd", "'s", "don't stop", "  leading and trailing  ",
             "tabs\tand\ttabs", "line1\nline2\r\nline3\rline4", "multiple     spaces", "end with space ",
             "\u00e9\u00e8\u00ea", "日本語のテキスト", "😀😀😀", "👨‍👩‍👧‍👦👨‍👩‍👧‍👦", "🇺🇸🇬🇧🇨🇦🇦🇺",
             "supercalifragilisticexpialidocious" * 5, "ĠHello Ċ", "▁hello ▁ world", "<0x41>", "<0xE4><0xB8>"]
    cases += SPECIALS[style]
    cases += [s + " after" for s in SPECIALS[style]] + ["before " + s for s in SPECIALS[style]]
    return cases


def make_cases(tok: Tokenizer, style: str, seed: int) -> list:
    rng = random.Random(seed)
    texts = fixed_cases(style)
    seen = set(texts)
    while len(texts) < N_CASES:
        t = random_text(rng, style)
        if t not in seen:
            seen.add(t)
            texts.append(t)
    rows = []
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False).ids
        row = {"text": text, "ids": ids}
        if i % 8 == 0:  # add_special_tokens=True on a subset keeps the files small
            row["ids_special"] = tok.encode(text, add_special_tokens=True).ids
        dec = tok.decode(ids, skip_special_tokens=False)
        if dec != text:
            row["decoded"] = dec
        dec_skip = tok.decode(ids, skip_special_tokens=True)
        if dec_skip != dec:
            row["decoded_skip"] = dec_skip
        rows.append(row)
    return rows


# ---- corpora and trained tokenizers ----------------------------------------------------------

SYLLABLES = ("ka ro mi ten ing tion al er an re de con pre pro com ex in un dis ly ment ness ous ful able "
             "st tr pl gr sh ch th ph qu ve ze lo ni ba su fe go hu ja ki").split()


def pseudo_word(rng: random.Random) -> str:
    w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
    return w.capitalize() if rng.random() < 0.15 else w


def training_corpus(seed: int, n: int = 8000) -> list:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.random()
        if k < 0.3:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + rng.choice([".", "!", "?", ",", ""]))
        elif k < 0.55:
            lines.append(" ".join(pseudo_word(rng) for _ in range(rng.randint(4, 16))) + rng.choice([".", "!", "?", ",", ""]))
        elif k < 0.7:
            lines.append(rng.choice(ENGLISH))
        elif k < 0.85:
            lines.append(rng.choice(MULTILINGUAL[:20]))
        elif k < 0.95:
            lines.append(rng.choice(CODE))
        else:
            lines.append(" ".join(rng.choice(NUMBERS + PUNCT) for _ in range(4)))
    return lines


def train_metaspace_model(seed: int) -> tuple:
    """A small BPE with byte_fallback, returned as (vocab, merges) with Llama 2's id layout:
    <unk> <s> </s>, then <0x00>..<0xFF>, then the learned pieces."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # limit_alphabet keeps rare characters out of the vocabulary, so byte fallback gets exercised.
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=120,
                                  show_progress=False)
    tok.train_from_iterator(training_corpus(seed), trainer=trainer)
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in learned:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = spec["model"]["merges"]
    return vocab, merges


def special(id_, content, **kw):
    d = {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
    d.update(kw)
    return d


def llama2_json(vocab, merges) -> dict:
    merges_str = [" ".join(m) if isinstance(m, list) else m for m in merges]  # the old "a b" format
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges_str},
    }


def metaspace_json(vocab, merges) -> dict:
    n = len(vocab)
    merges_pairs = [m if isinstance(m, list) else m.split(" ") for m in merges]  # the new pair format
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>"),
                         special(n, "<mask>", lstrip=True), special(n + 1, "<sep>", rstrip=True),
                         special(n + 2, "[WORD]", single_word=True, special=False),
                         special(n + 3, "<norm>", normalized=True, special=False)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"}, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges_pairs},
    }


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                   "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(3, 12)]


def llama3_json(seed: int) -> dict:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_corpus(seed + 1), trainer=trainer)
    spec = json.loads(tok.to_str())
    # Whole pre-tokens that the merges do not reach: only ignore_merges can produce these ids.
    vocab = spec["model"]["vocab"]
    added = 0
    for text in MULTILINGUAL + CODE + EMOJI + ODD + ["antidisestablishmentarianism supercalifragilisticexpialidocious"]:
        for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text):
            if added < 60 and piece not in vocab and len(piece) > 3 and len(tok.model.tokenize(piece)) > 1:
                vocab[piece] = len(vocab)
                added += 1
    n = len(vocab)
    spec["added_tokens"] = [special(n + i, s) for i, s in enumerate(LLAMA3_SPECIALS)]
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    spec["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [n], "tokens": ["<|begin_of_text|>"]}}}]}
    return spec


# ---- chat templates --------------------------------------------------------------------------

LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA2_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
                   "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
                   "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                   "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
                   "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
                   "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
                   "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
                    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# More ChatML variants, rendered with the SmolLM2 tokenizer into chat_templates.jsonl.
EXTRA_TEMPLATES = {
    "qwen2": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
              "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
              "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "chatml_plain": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                     "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                     "{% endif %}"),
    "chatml_escaped_default": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                               "{{ '<|im_start|>system\\nYou are \\'Bot\\', a\\tterse helper.<|im_end|>\\n' }}"
                               "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                               "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                               "{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}

CONVERSATIONS = [
    [("user", "Hello!")],
    [("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?")],
    [("system", "You are terse."), ("user", "Explain speculative decoding.")],
    [("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
    [("user", "  padded content with spaces  \n")],
    [("user", "多语言：你好 🌍 مرحبا"), ("assistant", " Привет! ")],
    [("system", "Line one.\nLine two."), ("user", "<|im_start|> is text here")],
    [("user", "")],
    [("assistant", "I start the conversation.")],
    [("user", "a"), ("user", "b")],
]


def tokenizer_config(template, bos, eos, extra=None) -> dict:
    cfg = {"bos_token": bos, "eos_token": eos, "chat_template": template, "clean_up_tokenization_spaces": False,
           "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}
    cfg.update(extra or {})
    return cfg


def make_chat_cases(folder: Path) -> list:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    rows = []
    for conv in CONVERSATIONS:
        msgs = [{"role": r, "content": c} for r, c in conv]
        for gen in (False, True):
            row = {"messages": msgs, "add_generation_prompt": gen}
            try:
                row["text"] = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                # apply_chat_template(tokenize=True) encodes without adding special tokens
                row["ids"] = fast.encode(row["text"], add_special_tokens=False).ids
            except Exception as e:  # the template raised (roles that do not alternate, a system role)
                row["error"] = str(e).splitlines()[0][:200]
            rows.append(row)
    return rows


def make_extra_chat_cases() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copyfile(OUT / "smollm2" / "tokenizer.json", folder / "tokenizer.json")
        for name, template in EXTRA_TEMPLATES.items():
            (folder / "tokenizer_config.json").write_text(json.dumps(
                tokenizer_config(template, "<|im_start|>", "<|im_end|>", {"tokenizer_class": "GPT2Tokenizer"})))
            for row in make_chat_cases(folder):
                rows.append({"name": name, "template": template, **row})
    write_jsonl(OUT / "chat_templates.jsonl", rows)
    print(f"chat_templates: {len(rows)} cases")


# ---- writing ---------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_style(style: str, spec: dict, config: dict, seed: int) -> None:
    folder = OUT / style
    folder.mkdir(parents=True, exist_ok=True)
    if spec is not None:
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1), encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    rows = make_cases(tok, style, seed)
    write_jsonl(folder / "cases.jsonl", rows)
    chat = make_chat_cases(folder)
    write_jsonl(folder / "chat.jsonl", chat)
    print(f"{style}: {len(rows)} cases, {len(chat)} chat cases, vocab {tok.get_vocab_size()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"),
                    help="the converted SmolLM2 folder (tools/convert_smollm2.py)")
    ap.add_argument("--seed", type=int, default=20240611)
    args = ap.parse_args()

    src = Path(args.smollm2)
    if not (src / "tokenizer.json").exists():
        print(f"{src}/tokenizer.json not found: run tools/convert_smollm2.py first", file=sys.stderr)
        return 1
    dst = OUT / "smollm2"
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    shutil.copyfile(src / "tokenizer_config.json", dst / "tokenizer_config.json")
    write_style("smollm2", None, None, args.seed)

    vocab, merges = train_metaspace_model(args.seed)
    write_style("llama2", llama2_json(vocab, merges),
                tokenizer_config(LLAMA2_TEMPLATE, "<s>", "</s>", {"add_bos_token": True, "unk_token": "<unk>"}),
                args.seed + 1)
    write_style("metaspace", metaspace_json(vocab, merges),
                tokenizer_config(MISTRAL_TEMPLATE, "<s>", "</s>", {"unk_token": "<unk>"}), args.seed + 2)
    write_style("llama3", llama3_json(args.seed),
                tokenizer_config(LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"), args.seed + 3)
    make_extra_chat_cases()
    return 0


if __name__ == "__main__":
    sys.exit(main())
