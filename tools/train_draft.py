#!/usr/bin/env python3
"""Distills a small Llama-architecture draft model from a Hugging Face causal-LM target.

The draft shares the target's vocabulary and ties its output head to its input embedding, so the
folder it writes loads in canopy (and in transformers) as a draft for that target.

What it does, in one run (every phase is bounded by wall-clock seconds, so a run fits in a
10-minute GPU lease):

  1. prompts: builds a broad set of chat prompts from templates x topics (chat, factual questions,
     arithmetic word problems, summarisation, translation, code, stories and poems, answering from
     a given context, instructions). Nothing is downloaded. About 3% of them, chosen by a hash of
     the text, are held out for evaluation.
  2. data: the target answers each prompt with its own chat template. Batches alternate between
     greedy decoding and sampling (T=0.7 and T=1.0 with top-p 0.95) and between 128, 256 and 384
     new tokens; answers end at the target's end-of-turn token. Sequences are kept as token ids
     in WORK/data.pt and appended to on later runs.
  3. training: the loss is the forward KL divergence KL(p_target || q_draft) over the full
     vocabulary at every answer position, with the target's logits computed on the fly in the
     same step (no logits are stored). AdamW, linear warm-up then cosine decay over the run's
     time budget. Held-out top-1 agreement (draft argmax == target argmax), top-4 coverage, KL,
     and an estimate of the greedy chain:4 mean accepted length are logged every --eval-every
     steps.
  4. output: WORK/ckpt.pt (fp32 weights, optimizer, step; --resume continues from it), and the
     draft folder --out (config.json + model.safetensors in bf16). --export-fp32 DIR also writes
     the fp32 weights in shards of at most --shard-mb MB (for carrying them off a machine whose
     file transfers are size-limited); `train_draft.py merge SHARD_DIR --out DIR` turns such
     shards back into a draft folder, and `--init-from SHARD_DIR` resumes from them (weights
     only: the optimizer state restarts).

The draft's embedding starts as the projection of the target's embedding matrix on its top
principal directions (the right singular vectors of the uncentered matrix), which gives the tied
head a vocabulary geometry from step 0.

    python tools/train_draft.py train --target models/SmolLM2-135M-Instruct \
        --out drafts/SmolLM2-135M-draft --work /tmp/draft-work --gen-seconds 180 --train-seconds 330
    python tools/train_draft.py merge SHARD_DIR --out drafts/SmolLM2-135M-draft

Requirements: tools/requirements-train.txt (torch, transformers, safetensors, numpy).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"train_draft: missing Python package ({exc}); install tools/requirements-train.txt")

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Prompts: templates x topics
# --------------------------------------------------------------------------------------------

TOPICS = """photosynthesis|the water cycle|volcanoes|earthquakes|black holes|the moon|the solar system|
gravity|magnets|electricity|rainbows|clouds|the seasons|tides|the human heart|the brain|sleep|
vitamins|exercise|meditation|the immune system|bees|ants|whales|dolphins|penguins|elephants|owls|
butterflies|coral reefs|rainforests|deserts|glaciers|rivers|the ocean|recycling|composting|
solar power|wind energy|electric cars|bicycles|trains|airplanes|rockets|satellites|the internet|
computers|smartphones|robots|artificial intelligence|video games|databases|encryption|passwords|
cloud storage|spreadsheets|email|social media|the printing press|the Roman Empire|ancient Egypt|
the pyramids|the Great Wall of China|the Renaissance|the Industrial Revolution|democracy|taxes|
money|banks|inflation|saving money|budgeting|starting a small business|job interviews|teamwork|
public speaking|time management|studying for exams|learning to code|learning a musical instrument|
playing chess|painting|photography|gardening|baking bread|making coffee|brewing tea|cooking pasta|
chocolate|cheese|honey|olive oil|spices|rice|potatoes|apples|bananas|tomatoes|soccer|basketball|
tennis|swimming|running a marathon|yoga|hiking|camping|fishing|sailing|skiing|birthdays|weddings|
holidays|friendship|kindness|patience|honesty|curiosity|libraries|museums|theaters|zoos|
national parks|cities|villages|farms|bridges|skyscrapers|castles|lighthouses|maps|compasses|
clocks|calendars|the alphabet|poetry|novels|fairy tales|myths|music|jazz|classical music|dance|
movies|cartoons|comics|climate change|air pollution|clean water|forests|soil|weather forecasts|
thunderstorms|snow|hurricanes|dinosaurs|fossils|DNA|cells|bacteria|viruses|vaccines|medicine|
first aid|dentists|nurses|teachers|firefighters|pilots|astronauts|scientists|inventors|farmers|
cats|dogs|horses|rabbits|goldfish|parrots|houseplants|sunflowers|roses|trees|mushrooms""".replace("\n", "")

CHAT_TEMPLATES = [
    "What are some fun facts about {t}?", "Can you tell me about {t}?",
    "Explain {t} to a ten-year-old.", "Why is {t} important?", "What should I know about {t}?",
    "Give me {n} tips about {t}.", "What are the pros and cons of {t}?",
    "How can I learn more about {t}?", "Write a short paragraph about {t}.",
    "What are common misconceptions about {t}?", "Explain {t} in simple words.",
    "I am curious about {t}. Where should I start?", "Describe {t} in three sentences.",
    "What is the history of {t}?", "How does {t} affect everyday life?",
    "Tell me something surprising about {t}.", "What questions do people often ask about {t}?",
    "Compare {t} and {u}.", "What do {t} and {u} have in common?", "Is {t} good or bad? Why?",
]
INSTRUCT_TEMPLATES = [
    "List {n} things related to {t}.", "Write a thank-you note to {p}.",
    "Write a short email to {p} about {t}.", "Give me a simple plan for a day about {t}.",
    "Make a checklist for {a}.", "Describe {t} as if you were {p}.",
    "Give me {n} ideas for {a}.", "What are {n} ways to {v}?", "How do I {v}?",
    "Write step-by-step instructions to {v}.", "Suggest {n} names for a blog about {t}.",
    "Write a short advertisement for a product related to {t}.",
    "Write a motivational message for someone who wants to {v}.",
    "Rewrite this sentence to be more polite: Give me the report now.",
    "Explain what {t} is and give an example.", "Describe a {place} in the morning.",
    "What are {n} ways to stay healthy while {a}?",
]
ACTIVITIES = ["a rainy day", "a road trip", "a birthday party", "moving to a new city",
              "a first day at school", "a picnic", "a job interview", "a weekend at home",
              "a camping trip", "learning to cook", "a family dinner", "a school project",
              "a long flight", "a winter holiday", "a visit to the beach", "working from home"]
VERBS = ["save energy at home", "sleep better", "make new friends", "learn a new language",
         "start running", "cook a healthy dinner", "keep a journal", "organize a closet",
         "plant a vegetable garden", "write a good essay", "prepare for an exam",
         "reduce stress", "take care of a cat", "fix a flat bicycle tire", "make a budget",
         "read more books", "drink more water", "clean a kitchen", "paint a room",
         "learn to swim", "bake cookies", "take better photos", "stay focused while studying"]
PEOPLE = ["a teacher", "a doctor", "a neighbor", "my grandmother", "a coach", "a friend",
          "a librarian", "a nurse", "my boss", "a pirate", "a scientist", "a child", "a robot"]
PLACES = ["busy market", "quiet forest", "small town", "mountain lake", "city park",
          "old library", "train station", "farm", "snowy village", "beach"]

QA_TEMPLATES = [
    "What is {t}?", "How does {t} work?", "Who discovered or invented {t}?",
    "Where can you find {t}?", "When did people start using {t}?",
    "What is the main idea behind {t}?", "Why do we need {t}?",
]
QA_FACTS = [
    "What is the capital of {c}?", "What language is spoken in {c}?",
    "What continent is {c} in?", "What is a famous food from {c}?",
    "What is the largest city in {c}?",
]
COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Mexico",
             "Kenya", "Australia", "Germany", "Spain", "China", "Peru", "Norway", "Greece",
             "Turkey", "Argentina", "Vietnam", "Morocco", "Sweden", "Chile", "Thailand"]
SCIENCE_QA = ["How many legs does a spider have?", "What gas do plants take in?",
              "How many days are in a leap year?", "What is the freezing point of water?",
              "What is the largest planet in the solar system?", "How many continents are there?",
              "What is the chemical symbol for gold?", "How many hours are in a week?",
              "What is the fastest land animal?", "What is the largest ocean on Earth?",
              "Which organ pumps blood through the body?", "How many sides does a hexagon have?",
              "What is the closest star to Earth?", "Which animal is the tallest?",
              "What do bees make?", "What is the hardest natural material?"]

NAMES = ["Sara", "Tom", "Ana", "Ben", "Lily", "Omar", "Mia", "Leo", "Nina", "Raj", "Zoe",
         "Max", "Eva", "Sam", "Kim", "Luis", "Aiko", "Jack", "Ella", "Noah"]
ITEMS = ["apples", "books", "pencils", "cookies", "stickers", "marbles", "cards", "flowers",
         "eggs", "coins", "toy cars", "shells"]


def math_prompt(r: random.Random) -> str:
    a, b, c = r.randint(2, 99), r.randint(2, 30), r.randint(2, 12)
    nm, it = r.choice(NAMES), r.choice(ITEMS)
    forms = [
        f"What is {a} multiplied by {c}? Explain.", f"What is {a} plus {b}?",
        f"What is {a * c} divided by {c}?", f"What is {a} minus {b}? Show your work.",
        f"{nm} has {a} {it} and gives away {min(b, a - 1)}. How many are left?",
        f"{nm} reads {b} pages a day. How many pages does {nm} read in {c} days?",
        f"A book costs {a} dollars and is on sale for {r.choice([10, 20, 25, 50])} percent off. "
        f"What is the sale price?",
        f"What is the sum of the numbers from 1 to {r.randint(5, 20)}?",
        f"A train travels {a} kilometers per hour for {c} hours. How far does it go?",
        f"There are {c} boxes with {b} {it} in each box. How many {it} are there in total?",
        f"What is {r.choice([10, 20, 25, 50])} percent of {a * 4}?",
        f"{nm} is {b} years old. How old will {nm} be in {c} years?",
        f"A rectangle is {b} cm long and {c} cm wide. What is its area?",
        f"Is {a} an even or an odd number? Explain.", f"What is {c} squared?",
        f"Solve for x: x + {b} = {a + b}.",
    ]
    return r.choice(forms)


SUMMARY_BITS = {
    "who": ["The school", "A small bakery", "The city council", "A group of students",
            "The local library", "A young farmer", "The museum", "A team of scientists",
            "The town", "An old fisherman", "A soccer club", "A family"],
    "did": ["held its annual fair on Saturday", "opened a new garden", "started a reading program",
            "won a regional prize", "built a playground", "raised money for a shelter",
            "planted two hundred trees", "organized a music festival", "cleaned the river bank",
            "launched a recycling project", "fixed the old bridge", "hosted a cooking contest"],
    "detail": ["More than fifty people came to help.", "It took almost three months of work.",
               "Children and parents joined in.", "The mayor gave a short speech.",
               "Everyone brought food to share.", "It rained, but nobody left early.",
               "Volunteers worked every weekend.", "Local shops donated supplies.",
               "A newspaper wrote about the event.", "The project cost less than expected."],
    "end": ["They plan to do it again next year.", "The results surprised everyone.",
            "Many people said it was the best day of the year.",
            "Now the whole town is talking about it.", "The money will buy new books.",
            "The winners received a small trophy."],
}


def summary_prompt(r: random.Random) -> str:
    s = SUMMARY_BITS
    text = (f"{r.choice(s['who'])} {r.choice(s['did'])}. {r.choice(s['detail'])} "
            f"{r.choice(s['detail'])} {r.choice(s['end'])}")
    head = r.choice(["Summarize in one sentence: ", "Summarize: ", "Give a short summary of this text: ",
                     "What is the main point of this paragraph? ", "Write a title for this text: "])
    return head + text


SENTENCES = ["Good morning, how are you?", "I like to read books in the evening.",
             "Where is the train station?", "The weather is very nice today.",
             "My brother plays the guitar.", "We are going to the beach tomorrow.",
             "Can I have a glass of water, please?", "The cat is sleeping on the sofa.",
             "I am learning to cook.", "Thank you for your help.", "What time is it?",
             "The store opens at nine o'clock.", "She has two sisters and one brother.",
             "I would like to buy this shirt.", "It is raining outside.",
             "Our teacher is very kind.", "Happy birthday to you!", "I need a new phone."]
LANGS = ["French", "Spanish", "German", "Italian", "Portuguese"]

CODE_TASKS = ["reverses a list", "counts the vowels in a string", "returns the maximum of two integers",
              "checks if a number is prime", "computes the factorial of a number",
              "returns the sum of a list of numbers", "checks if a string is a palindrome",
              "finds the smallest element in an array", "converts Celsius to Fahrenheit",
              "counts the words in a sentence", "removes duplicates from a list",
              "computes the average of an array", "returns the n-th Fibonacci number",
              "sorts a list of numbers", "checks if a year is a leap year",
              "returns the length of a string", "swaps two variables", "prints a multiplication table"]
CODE_LANGS = ["Python", "Python", "Python", "C", "JavaScript", "Java", "C++"]
CODE_OTHER = ["Explain what a {x} is in programming.", "What is the difference between a list and a tuple in Python?",
              "How do I read a file in Python?", "What does a for loop do?",
              "Explain recursion with a simple example.", "What is a variable?",
              "How do I write a while loop in C?", "What is an API?"]
CODE_X = ["function", "loop", "variable", "class", "dictionary", "pointer", "string", "array", "compiler"]

HEROES = ["a dragon", "a little robot", "a brave mouse", "a lonely lighthouse keeper", "a young wizard",
          "a talking tree", "a lost puppy", "a curious girl", "an old sailor", "a shy giant",
          "a clever fox", "a princess", "a space explorer", "a snowman", "a tiny turtle"]
SITUATIONS = ["who is afraid of the dark", "who wants to fly", "who finds a secret door",
              "who loses a favorite toy", "who makes a new friend", "on the first day of spring",
              "who learns to share", "who travels to the moon", "who cannot sleep",
              "who finds a treasure map", "who wants to be a chef", "during a big storm"]
FORMS = ["Write a short story about {h} {s}.", "Write a haiku about {t}.", "Write a short poem about {t}.",
         "Write a bedtime story about {h} {s}.", "Write a limerick about {h}.",
         "Tell me a story about {h} {s}.", "Write a four-line poem about {t}."]

RAG = [
    ("The {place} opens at {h} am and closes at {h2} pm. Tickets cost {p} dollars for adults and "
     "{q} dollars for children.", ["How much do tickets for two adults and one child cost?",
                                   "When does the {place} open?", "How long is the {place} open each day?"]),
    ("{name} was born in {year} in {city}. {name} studied music and later became a famous {job}.",
     ["Where was {name} born?", "What did {name} become?", "In which year was {name} born?"]),
    ("The {river} River is {len} kilometers long and flows through {c1} and {c2}.",
     ["Which countries does the {river} River flow through?", "How long is the {river} River?"]),
    ("Our shop sells {it} for {p} dollars each. On Mondays, every customer gets one extra for free.",
     ["How much do three {it} cost?", "What happens on Mondays?"]),
]


def rag_prompt(r: random.Random) -> str:
    ctx, qs = r.choice(RAG)
    v = {"place": r.choice(["museum", "zoo", "aquarium", "science center", "castle", "gallery"]),
         "h": r.randint(8, 11), "h2": r.randint(4, 8), "p": r.randint(5, 30), "q": r.randint(2, 10),
         "name": r.choice(["Maria Lopez", "John Park", "Aisha Bello", "Lena Novak", "Kenji Sato"]),
         "year": r.randint(1900, 1995), "city": r.choice(["Lisbon", "Seoul", "Lagos", "Prague", "Osaka"]),
         "job": r.choice(["singer", "pianist", "composer", "violinist"]),
         "river": r.choice(["Blue", "Silver", "Green", "Stone"]), "len": r.randint(200, 3000),
         "c1": r.choice(COUNTRIES), "c2": r.choice(COUNTRIES), "it": r.choice(ITEMS)}
    return "Context: " + ctx.format(**v) + "\nQuestion: " + r.choice(qs).format(**v)


def build_prompts(seed: int, n: int) -> list:
    """n (category, prompt) pairs, deterministic in seed, without duplicates."""
    r = random.Random(seed)
    topics = [t.strip() for t in TOPICS.split("|") if t.strip()]

    def fill(tpl: str) -> str:
        t, u = r.sample(topics, 2)
        return tpl.format(t=t, u=u, n=r.choice([3, 4, 5]), p=r.choice(PEOPLE), a=r.choice(ACTIVITIES),
                          v=r.choice(VERBS), place=r.choice(PLACES), c=r.choice(COUNTRIES),
                          x=r.choice(CODE_X), h=r.choice(HEROES), s=r.choice(SITUATIONS))

    makers = [
        ("chat", 0.20, lambda: fill(r.choice(CHAT_TEMPLATES))),
        ("instruct", 0.16, lambda: fill(r.choice(INSTRUCT_TEMPLATES))),
        ("qa", 0.12, lambda: fill(r.choice(QA_TEMPLATES + QA_FACTS)) if r.random() < 0.8 else r.choice(SCIENCE_QA)),
        ("math", 0.12, lambda: math_prompt(r)),
        ("summarization", 0.08, lambda: summary_prompt(r)),
        ("translation", 0.07, lambda: f"Translate to {r.choice(LANGS)}: {r.choice(SENTENCES)}"),
        ("code", 0.10, lambda: (f"Write a {r.choice(CODE_LANGS)} function that {r.choice(CODE_TASKS)}."
                                if r.random() < 0.75 else fill(r.choice(CODE_OTHER)))),
        ("story", 0.09, lambda: fill(r.choice(FORMS))),
        ("rag", 0.06, lambda: rag_prompt(r)),
    ]
    cats, weights = [m[0] for m in makers], [m[1] for m in makers]
    seen, out, tries = set(), [], 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        k = r.choices(range(len(makers)), weights)[0]
        p = makers[k][2]()
        if p not in seen:
            seen.add(p)
            out.append((cats[k], p))
    return out


def is_heldout(prompt: str) -> bool:
    return hashlib.sha1(prompt.encode()).digest()[0] < 8  # ~3%


# --------------------------------------------------------------------------------------------
# Data: the target's own answers
# --------------------------------------------------------------------------------------------

MODES = [  # (name, weight, sampling kwargs)
    ("greedy", 0.5, dict(do_sample=False)),
    ("t0.7", 0.3, dict(do_sample=True, temperature=0.7, top_p=1.0, top_k=0)),
    ("t1.0", 0.2, dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0)),
]
LENGTHS = [(128, 0.3), (256, 0.5), (384, 0.2)]


@torch.no_grad()
def generate(target, tok, prompts, mode, max_new, device):
    """Token ids (prompt + answer up to and including end-of-turn) for each prompt."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    pad = tok.pad_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):  # left padding
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    kw = dict(MODES[[m[0] for m in MODES].index(mode)][2])
    out = target.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                          pad_token_id=pad, eos_token_id=tok.eos_token_id, **kw)
    out = out[:, width:].cpu()
    seqs = []
    for i, e in enumerate(enc):
        ans = out[i].tolist()
        if tok.eos_token_id in ans:
            ans = ans[:ans.index(tok.eos_token_id) + 1]
        if ans:
            seqs.append({"ids": torch.tensor(e + ans, dtype=torch.int32), "plen": len(e)})
    return seqs


def make_data(args, target, tok, device, data):
    """Appends the target's answers to data['train'] / data['heldout'] for --gen-seconds."""
    r = random.Random(args.seed * 7919 + len(data["train"]))
    prompts = build_prompts(args.seed + len(data["train"]), args.n_prompts)
    exclude = set()
    if args.exclude:
        for line in Path(args.exclude).read_text().splitlines():
            if line.strip():
                exclude.add(json.loads(line)["prompt"])
    held = [p for _, p in prompts if is_heldout(p) and p not in exclude]
    train = [p for _, p in prompts if not is_heldout(p) and p not in exclude]
    t_start = time.time()
    if not data["heldout"]:  # one greedy and one sampled batch of held-out prompts
        n = min(len(held), args.heldout_prompts)
        for mode in ("greedy", "t0.7"):
            seqs = generate(target, tok, held[:n], mode, args.heldout_new, device)
            for s in seqs:
                s["mode"] = mode
            data["heldout"] += seqs
        log(f"held-out: {len(data['heldout'])} sequences from {n} prompts")
    r.shuffle(train)
    pos, nb = 0, 0
    while time.time() - t_start < args.gen_seconds and pos < len(train):
        mode = r.choices([m[0] for m in MODES], [m[1] for m in MODES])[0]
        max_new = r.choices(args.lengths, [w for _, w in LENGTHS][:len(args.lengths)] or None)[0]
        batch = train[pos:pos + args.gen_batch]
        pos += len(batch)
        t = time.time()
        seqs = generate(target, tok, batch, mode, max_new, device)
        for s in seqs:
            s["mode"] = mode
        data["train"] += seqs
        nb += 1
        ntok = sum(len(s["ids"]) - s["plen"] for s in seqs)
        log(f"gen batch {nb}: {len(seqs)} x {mode} max {max_new}: {ntok} answer tokens in "
            f"{time.time() - t:.1f}s; train set {len(data['train'])} sequences")
    return data


# --------------------------------------------------------------------------------------------
# The draft
# --------------------------------------------------------------------------------------------

def draft_config(tcfg, args) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=tcfg.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, hidden_act="silu", max_position_embeddings=tcfg.max_position_embeddings,
        rms_norm_eps=tcfg.rms_norm_eps, rope_theta=getattr(tcfg, "rope_theta", None) or
        tcfg.rope_parameters["rope_theta"], tie_word_embeddings=True, bos_token_id=tcfg.bos_token_id,
        eos_token_id=tcfg.eos_token_id, pad_token_id=tcfg.pad_token_id, attention_bias=False, mlp_bias=False)


def pca_embedding(target_emb: torch.Tensor, k: int) -> torch.Tensor:
    """The target's embedding rows projected on their top-k right singular vectors (V x k)."""
    e = target_emb.float()
    _, _, vh = torch.linalg.svd(e, full_matrices=False)
    return e @ vh[:k].T


def count_params(cfg) -> dict:
    d, v, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    attn = d * cfg.num_attention_heads * hd * 2 + d * cfg.num_key_value_heads * hd * 2
    mlp = 3 * d * cfg.intermediate_size
    body = L * (attn + mlp + 2 * d) + d
    head = v * d  # tied: read once per forward as the output head
    return {"body": body, "embed_head": head, "per_forward": body + head}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def batches(seqs, tokens_per_step, r: random.Random):
    """Endless batches of about tokens_per_step tokens, bucketed by length to limit padding."""
    while True:
        idx = list(range(len(seqs)))
        r.shuffle(idx)
        for c in range(0, len(idx), 512):
            chunk = sorted(idx[c:c + 512], key=lambda i: len(seqs[i]["ids"]))
            cur, width = [], 0
            groups = []
            for i in chunk:
                w = max(width, len(seqs[i]["ids"]))
                if cur and w * (len(cur) + 1) > tokens_per_step:
                    groups.append(cur)
                    cur, w = [], len(seqs[i]["ids"])
                cur.append(i)
                width = w
            if cur:
                groups.append(cur)
            r.shuffle(groups)
            for g in groups:
                yield [seqs[i] for i in g]


def collate(group, pad, device):
    width = max(len(s["ids"]) for s in group)
    ids = torch.full((len(group), width), pad, dtype=torch.long)
    att = torch.zeros((len(group), width), dtype=torch.long)
    lossm = torch.zeros((len(group), width), dtype=torch.bool)
    for i, s in enumerate(group):
        n = len(s["ids"])
        ids[i, :n] = s["ids"].long()
        att[i, :n] = 1
        lossm[i, s["plen"] - 1:n - 1] = True  # position j predicts token j+1: every answer token
    return ids.to(device), att.to(device), lossm.to(device)


def kl_rows(t_logits, d_logits, chunk=8192):
    """Per-row KL(p_t || q_d) in fp32, plus argmaxes, in chunks to bound memory."""
    kls, ta, da, top4 = [], [], [], []
    for c in range(0, t_logits.shape[0], chunk):
        tl = t_logits[c:c + chunk].float()
        dl = d_logits[c:c + chunk].float()
        tlp = F.log_softmax(tl, -1)
        dlp = F.log_softmax(dl, -1)
        kls.append((tlp.exp() * (tlp - dlp)).sum(-1))
        ta.append(tl.argmax(-1))
        da.append(dl.argmax(-1))
        top4.append((dl.topk(4, -1).indices == ta[-1][:, None]).any(-1))
    return torch.cat(kls), torch.cat(ta), torch.cat(da), torch.cat(top4)


def teacher_logits(target, ids, att, lossm):
    with torch.no_grad():
        h = target.model(input_ids=ids, attention_mask=att).last_hidden_state
        return target.lm_head(h[lossm])


@torch.no_grad()
def evaluate(target, draft, data, pad, device, tokens_per_step):
    draft.eval()
    res = {}
    for mode in ("greedy", "t0.7"):
        seqs = [s for s in data["heldout"] if s["mode"] == mode]
        if not seqs:
            continue
        tot_kl, agree, cov4, n, chain = 0.0, 0, 0, 0, []
        for g in range(0, len(seqs), 32):
            group = seqs[g:g + 32]
            ids, att, lossm = collate(group, pad, device)
            tl = teacher_logits(target, ids, att, lossm)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                dh = draft.model(input_ids=ids, attention_mask=att).last_hidden_state
                dl = draft.lm_head(dh[lossm])
            kl, ta, da, t4 = kl_rows(tl, dl)
            tot_kl += kl.sum().item()
            match = (ta == da)
            agree += match.sum().item()
            cov4 += t4.sum().item()
            n += len(kl)
            # chain:4 estimate: per answer position, run of consecutive draft==target argmax
            # matches starting there (capped at 4), plus the bonus token. On greedy data the
            # answer tokens are the target's argmaxes, so this is what a chain of 4 would accept.
            off = 0
            for s in group:
                m = match[off:off + len(s["ids"]) - s["plen"]].tolist()
                off += len(m)
                run = 0
                runs = []
                for x in reversed(m):
                    run = run + 1 if x else 0
                    runs.append(min(run, 4))
                chain += runs
        res[mode] = {"kl": tot_kl / n, "top1": agree / n, "top4": cov4 / n, "positions": n,
                     "chain4_est": 1 + sum(chain) / max(1, len(chain))}
    draft.train()
    return res


def lr_at(step_frac, warm_frac, peak, floor=0.1):
    if step_frac < warm_frac:
        return peak * step_frac / warm_frac
    p = (step_frac - warm_frac) / max(1e-9, 1 - warm_frac)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def train(args, target, draft, data, device, work: Path, state):
    pad = target.config.pad_token_id
    emb = [p for n, p in draft.named_parameters() if "embed_tokens" in n]
    rest = [p for n, p in draft.named_parameters() if "embed_tokens" not in n]
    opt = torch.optim.AdamW([{"params": emb, "lr_mult": args.embed_lr_mult},
                             {"params": rest, "lr_mult": 1.0}], lr=args.lr, betas=(0.9, 0.98),
                            weight_decay=0.0, fused=device.type == "cuda")
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
        log("resumed optimizer state")
    r = random.Random(args.seed + state["step"])
    it = batches(data["train"], args.tokens_per_step, r)
    t_start, step0 = time.time(), state["step"]
    metrics = open(work / "metrics.jsonl", "a")
    last_eval = None
    while True:
        el = time.time() - t_start
        if el > args.train_seconds or (args.max_steps and state["step"] - step0 >= args.max_steps):
            break
        lr = lr_at(el / args.train_seconds, args.warmup_frac, args.lr)
        for gp in opt.param_groups:
            gp["lr"] = lr * gp["lr_mult"]
        ids, att, lossm = collate(next(it), pad, device)
        tl = teacher_logits(target, ids, att, lossm)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            dh = draft.model(input_ids=ids, attention_mask=att).last_hidden_state
            dl = draft.lm_head(dh[lossm])
        tlp = F.log_softmax(tl.float(), -1)
        dlp = F.log_softmax(dl.float(), -1)
        loss = (tlp.exp() * (tlp - dlp)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["tokens"] += int(lossm.sum())
        if state["step"] % args.log_every == 0:
            top1 = (tl.argmax(-1) == dl.argmax(-1)).float().mean().item()
            rec = {"step": state["step"], "loss_kl": round(loss.item(), 4), "train_top1": round(top1, 4),
                   "lr": round(lr, 6), "grad_norm": round(gn.item(), 3), "tokens": state["tokens"],
                   "elapsed_s": round(time.time() - t_start, 1)}
            log(json.dumps(rec))
            metrics.write(json.dumps(rec) + "\n")
        if args.eval_every and state["step"] % args.eval_every == 0:
            last_eval = evaluate(target, draft, data, pad, device, args.tokens_per_step)
            rec = {"step": state["step"], "eval": last_eval}
            log(json.dumps(rec))
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
    last_eval = evaluate(target, draft, data, pad, device, args.tokens_per_step)
    rec = {"step": state["step"], "eval": last_eval, "final": True, "tokens": state["tokens"]}
    log(json.dumps(rec))
    metrics.write(json.dumps(rec) + "\n")
    metrics.close()
    state["opt"] = opt.state_dict()
    state["last_eval"] = last_eval
    return state


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def hf_config_json(cfg) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
        "mlp_bias": False, "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_scaling": None,
        "rope_theta": (getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]),
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


def weights_of(draft) -> dict:
    """The draft's tensors under Hugging Face names, without the tied lm_head."""
    return {k: v.detach().float().cpu().contiguous() for k, v in draft.state_dict().items()
            if not k.startswith("lm_head")}


def write_draft_folder(weights: dict, cfg_json: dict, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
    bf = {k: v.to(torch.bfloat16).contiguous() for k, v in sorted(weights.items())}
    save_file(bf, str(out / "model.safetensors"), metadata={"format": "pt", **{k: str(v) for k, v in meta.items()}})
    log(f"wrote {out}/model.safetensors ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")


def write_shards(weights: dict, cfg_json: dict, out: Path, shard_mb: float, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
    limit = int(shard_mb * 1e6)
    shards, cur, size = [], {}, 0
    for k in sorted(weights):
        v = weights[k]
        nb = v.numel() * 4
        if nb > limit:  # split a large tensor (the embedding) by rows
            rows = max(1, limit // (v.shape[1] * 4))
            for j, r0 in enumerate(range(0, v.shape[0], rows)):
                shards.append({f"{k}@{r0}": v[r0:r0 + rows].contiguous()})
            continue
        if size + nb > limit and cur:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nb
    if cur:
        shards.append(cur)
    for i, s in enumerate(shards):
        save_file(s, str(out / f"fp32-{i:02d}.safetensors"), metadata={k: str(v) for k, v in meta.items()})
    log(f"wrote {len(shards)} fp32 shards to {out}")


def read_shards(d: Path) -> tuple:
    parts: dict = {}
    for f in sorted(d.glob("fp32-*.safetensors")):
        for k, v in load_file(str(f)).items():
            name, _, r0 = k.partition("@")
            parts.setdefault(name, []).append((int(r0 or 0), v))
    weights = {k: torch.cat([v for _, v in sorted(p, key=lambda x: x[0])]) for k, p in parts.items()}
    return weights, json.loads((d / "config.json").read_text())


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log(f"device {device}; torch {torch.__version__}")
    tok = AutoTokenizer.from_pretrained(args.target)
    # fp32 target: its argmax should match canopy's fp32 CPU forward as closely as possible.
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).to(device).eval()
    tok.padding_side = "left"
    tcfg = target.config

    data_path = work / "data.pt"
    data = torch.load(data_path) if data_path.exists() else {"train": [], "heldout": []}
    log(f"data: {len(data['train'])} train, {len(data['heldout'])} held-out sequences on disk")
    if args.gen_seconds > 0:
        data = make_data(args, target, tok, device, data)
        torch.save(data, data_path)
    ntok = sum(len(s["ids"]) - s["plen"] for s in data["train"])
    log(f"data: {len(data['train'])} train sequences, {ntok} answer tokens")
    if args.train_seconds > 0 and (not data["train"] or not data["heldout"]):
        sys.exit("train_draft: no training or held-out data (raise --gen-seconds)")

    ckpt = work / "ckpt.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        cfg = LlamaConfig(**state["config"])
        draft = LlamaForCausalLM(cfg)
        draft.load_state_dict(state["model"], strict=False)
        draft.tie_weights()
        log(f"resumed {ckpt} at step {state['step']}")
    else:
        if args.init_from:
            weights, cj = read_shards(Path(args.init_from))
            cfg = LlamaConfig(**cj)
            draft = LlamaForCausalLM(cfg)
            missing = draft.load_state_dict(weights, strict=False)
            draft.tie_weights()
            prev = json.loads((Path(args.init_from) / "state.json").read_text()) if (Path(args.init_from) / "state.json").exists() else {}
            state = {"step": prev.get("step", 0), "tokens": prev.get("tokens", 0)}
            log(f"initialised from fp32 shards {args.init_from} (step {state['step']}; optimizer restarts); "
                f"missing {missing.missing_keys}")
        else:
            cfg = draft_config(tcfg, args)
            draft = LlamaForCausalLM(cfg)
            with torch.no_grad():
                draft.model.embed_tokens.weight.copy_(pca_embedding(target.model.embed_tokens.weight, args.hidden))
            draft.tie_weights()
            state = {"step": 0, "tokens": 0}
    draft.to(device).train()
    cost, tcost = count_params(draft.config), count_params(tcfg)
    log(f"draft: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} heads, ffn {cfg.intermediate_size}; weights read per forward "
        f"{cost['per_forward'] / 1e6:.2f} M vs target {tcost['per_forward'] / 1e6:.2f} M "
        f"(ratio {cost['per_forward'] / tcost['per_forward']:.3f})")
    if args.train_seconds > 0:
        state = train(args, target, draft, data, device, work, state)
    cj = hf_config_json(draft.config)
    state.update(config=cj, model=weights_of(draft))
    torch.save(state, ckpt)
    log(f"saved {ckpt}")
    meta = {"step": state["step"], "tokens": state["tokens"]}
    if args.out:
        write_draft_folder(state["model"], cj, Path(args.out), meta)
    if args.export_fp32:
        write_shards(state["model"], cj, Path(args.export_fp32), args.shard_mb, meta)
        (Path(args.export_fp32) / "state.json").write_text(json.dumps(
            {"step": state["step"], "tokens": state["tokens"], "last_eval": state.get("last_eval")}, indent=1))
    return 0


def cmd_merge(args) -> int:
    weights, cj = read_shards(Path(args.shards))
    st = Path(args.shards) / "state.json"
    meta = json.loads(st.read_text()) if st.exists() else {}
    write_draft_folder(weights, cj, Path(args.out), {k: meta[k] for k in ("step", "tokens") if k in meta})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="generate data, train, write the draft")
    t.add_argument("--target", required=True, help="the target's Hugging Face folder")
    t.add_argument("--out", help="draft folder to write (config.json, model.safetensors bf16)")
    t.add_argument("--work", required=True, help="folder for data.pt, ckpt.pt, metrics.jsonl")
    t.add_argument("--export-fp32", help="also write fp32 weights here in shards of --shard-mb")
    t.add_argument("--shard-mb", type=float, default=15.0)
    t.add_argument("--resume", action="store_true", help="continue from WORK/ckpt.pt (weights + optimizer)")
    t.add_argument("--init-from", help="start from fp32 shards written by --export-fp32 (weights only)")
    t.add_argument("--exclude", help="jsonl file whose 'prompt' fields must not be used for training")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=1)
    # draft shape
    t.add_argument("--hidden", type=int, default=192)
    t.add_argument("--layers", type=int, default=8)
    t.add_argument("--heads", type=int, default=3)
    t.add_argument("--kv-heads", type=int, default=1)
    t.add_argument("--intermediate", type=int, default=512)
    # data
    t.add_argument("--gen-seconds", type=float, default=180)
    t.add_argument("--gen-batch", type=int, default=512)
    t.add_argument("--n-prompts", type=int, default=40000)
    t.add_argument("--lengths", type=lambda x: [int(v) for v in x.split(",")], default=[x[0] for x in LENGTHS],
                   help="answer lengths (max new tokens) to draw from, weighted 0.3/0.5/0.2")
    t.add_argument("--heldout-new", type=int, default=256, help="max new tokens of held-out answers")
    t.add_argument("--heldout-prompts", type=int, default=256, help="held-out prompts (each answered twice)")
    # training
    t.add_argument("--train-seconds", type=float, default=300)
    t.add_argument("--max-steps", type=int, default=0)
    t.add_argument("--tokens-per-step", type=int, default=32768)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--embed-lr-mult", type=float, default=0.3)
    t.add_argument("--warmup-frac", type=float, default=0.03)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--eval-every", type=int, default=500)
    t.set_defaults(fn=cmd_train)
    m = sub.add_parser("merge", help="fp32 shards (--export-fp32) -> draft folder with bf16 model.safetensors")
    m.add_argument("shards")
    m.add_argument("--out", required=True)
    m.set_defaults(fn=cmd_merge)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
