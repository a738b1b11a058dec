"""The built-in demo data set: generated product search, four relevance levels, with reasons.

``python -m ugd.train`` with no data trains on this. It stands in for the paper's QLQ (queries
against landing-page descriptions, four relevance levels, a written reason), and it is made so that
a tiny model trained from scratch learns it on a CPU in minutes: every fact the label depends on
appears as a word shared (or not) between the query and the page, the pages are short (a title and
a closing sentence, both naming the product and its colour), the vocabulary is small (under 100
words), and the reasons follow one short template per level.

    train, eval = demo_splits()                          # 2000 / 400 records, deterministic
    tok = build_tokenizer(train + eval)                  # word-level, lowercased, built offline
    ugd.data.layout.add_special_tokens(tok)                   # [CLS] [gMask] [Start], as for any backbone
    config = tiny_backbone_config(len(tok))              # a Qwen2Config (or family="llama")

Relevance of a page to a query ``[brand] colour product`` (a product is ``modifier head``, e.g.
"running shoes"; the head is its category):

    3  exact match: same product and colour (and brand, when the query names one)
    2  same product, another colour
    1  same category (head), another product ("hiking shoes" for "running shoes")
    0  another category

The query's other words (cheap, for kids, ...) and the rest of the page (brand, attributes, ...)
are noise that does not change the label; the query alone or the page alone says nothing about it.
Labels are balanced (counts differ by at most one). For a tiny random-init model the levels come in
this order: the category (0 against the rest) first, then the product (1), the colour (2 against 3)
last. ``long_pages=True`` gives longer, more realistic and much harder pages. Nothing here downloads
anything.
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from .layout import SPECIAL_TOKENS, LayoutConfig

PAD, UNK, EOS = "<pad>", "<unk>", "</s>"

#: category (the product's head noun) -> product modifiers; every modifier belongs to one category.
#: The vocabulary is kept small on purpose: a model trained from scratch must see every product and
#: colour word often in a few hundred steps.
CATEGORIES = {
    "shoes": ("running", "hiking", "dress"),
    "earbuds": ("wireless", "gaming", "sleep"),
    "jacket": ("rain", "ski", "denim"),
    "backpack": ("laptop", "school", "camera"),
    "lamp": ("desk", "floor", "reading"),
    "mug": ("coffee", "ceramic", "enamel"),
}
#: how a reason names a category
CATEGORY_NAMES = {"shoes": "shoes", "earbuds": "earbuds", "jacket": "jackets", "backpack": "backpacks",
                  "lamp": "lamps", "mug": "mugs"}
COLOURS = ("red", "blue", "black", "white", "green", "yellow")
BRANDS = ("acme", "nordpeak", "zento", "lumo", "vexa", "orbix")
QUERY_ATTRIBUTES = ("cheap", "best", "new", "premium")
AUDIENCES = ("for men", "for women", "for kids")
PAGE_ATTRIBUTES = ("lightweight", "durable", "stylish", "compact", "affordable", "handmade")

#: per category, sentences about the product (category words, never a product modifier or colour)
FEATURES = {
    "shoes": ("a cushioned sole keeps your feet comfortable all day.",
              "the grippy outsole works on wet ground."),
    "earbuds": ("eight hours of music on one charge.",
                "clear sound and a secure fit in the ear."),
    "jacket": ("a warm lining keeps out the wind.",
               "two zipped pockets and an adjustable hood."),
    "backpack": ("padded straps and many compartments.",
                 "a zipped main pocket and a side pocket."),
    "lamp": ("a soft warm light with three brightness levels.",
             "an adjustable arm puts the light where you need it."),
    "mug": ("holds a generous cup and is dishwasher safe.",
            "a comfortable handle and a wide base."),
}
FILLERS = (
    "free delivery on orders over 50 dollars.",
    "order today and it ships tomorrow.",
    "easy returns within 30 days.",
    "rated 4 stars by our customers.",
)

TITLE_TEMPLATES = (
    "{brand} {colour} {product}.",
    "meet the {brand} {product} in {colour}.",
    "shop the {colour} {product} by {brand}.",
)
#: the page's last sentence names the product and its colour again
CLOSING_TEMPLATES = (
    "our {colour} {product}: {a1} and {a2}.",
    "get the {a1} {colour} {product} today.",
    "the {colour} {product}, {a1} and built to last.",
)
QUERY_TEMPLATES = (  # (template, uses a brand)
    ("{colour} {product}", False),
    ("{brand} {colour} {product}", True),
    ("{attr} {colour} {product}", False),
    ("{colour} {product} {aud}", False),
    ("{attr} {brand} {colour} {product}", True),
    ("buy {colour} {product} online", False),
)
REASONS = {
    3: "exact match: the page sells {brand}{colour} {product}.",
    2: "same product, but the page shows {d_colour}, not {colour}.",
    1: "related only: {d_product}, not {product}.",
    0: "unrelated: the page is about {d_category}, not {category}.",
}

NUM_LABELS = 4
LABEL_NAMES = ("unrelated", "related category", "same product, other colour", "exact match")


def _pick_other(rng: random.Random, options: Sequence, exclude) -> object:
    return rng.choice([o for o in options if o != exclude])


def _document(rng: random.Random, modifier: str, head: str, colour: str, brand: str, long_pages: bool = False) -> str:
    """A short landing page: a title and a closing sentence, both naming the product and its colour
    (about 12-16 words). ``long_pages`` puts a sentence about the category and a shop sentence in
    between (about 25 words): more realistic, and much slower for a model trained from scratch."""
    product = f"{modifier} {head}"
    a1, a2 = rng.sample(PAGE_ATTRIBUTES, 2)
    parts = [rng.choice(TITLE_TEMPLATES).format(brand=brand, colour=colour, product=product)]
    if long_pages:
        parts += [rng.choice(FEATURES[head]), rng.choice(FILLERS)]
    parts.append(rng.choice(CLOSING_TEMPLATES).format(colour=colour, product=product, a1=a1, a2=a2))
    return " ".join(parts)


def _record(rng: random.Random, label: int, long_pages: bool) -> dict:
    heads = sorted(CATEGORIES)
    head = rng.choice(heads)
    modifier = rng.choice(CATEGORIES[head])
    product = f"{modifier} {head}"
    colour = rng.choice(COLOURS)
    template, has_brand = rng.choice(QUERY_TEMPLATES)
    brand = rng.choice(BRANDS)
    query = template.format(colour=colour, product=product, brand=brand, attr=rng.choice(QUERY_ATTRIBUTES),
                            aud=rng.choice(AUDIENCES))

    d_head, d_modifier, d_colour, d_brand = head, modifier, colour, rng.choice(BRANDS)
    if label == 3:
        if has_brand:
            d_brand = brand
    elif label == 2:
        d_colour = _pick_other(rng, COLOURS, colour)
    elif label == 1:
        d_modifier = _pick_other(rng, CATEGORIES[head], modifier)
        d_colour = rng.choice(COLOURS)
    else:
        d_head = _pick_other(rng, heads, head)
        d_modifier = rng.choice(CATEGORIES[d_head])
        d_colour = rng.choice(COLOURS)
    document = _document(rng, d_modifier, d_head, d_colour, d_brand, long_pages)
    reason = REASONS[label].format(brand=f"{brand} " if has_brand else "", colour=colour, product=product,
                                   d_colour=d_colour, d_product=f"{d_modifier} {d_head}", category=CATEGORY_NAMES[head],
                                   d_category=CATEGORY_NAMES[d_head])
    return {"query": query, "document": document, "label": label, "reason": reason}


def generate_records(n: int, *, seed: int = 0, long_pages: bool = False) -> list[dict]:
    """``n`` demo records ``{"query", "document", "label", "reason"}``, labels 0..3 balanced (counts
    differ by at most one, order shuffled). Deterministic: the same arguments give the same list.

    ``long_pages=True`` makes each page about twice as long (a sentence about the category and a
    shop sentence between the title and the closing sentence): closer to real landing pages, but a
    tiny model trained from scratch needs many more steps to find the product words among them.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    labels = [i % NUM_LABELS for i in range(n)]
    rng.shuffle(labels)
    return [_record(rng, label, long_pages) for label in labels]


def demo_splits(n_train: int = 2000, n_eval: int = 400, seed: int = 0, *,
                long_pages: bool = False) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` records, generated with the disjoint seeds ``2 * seed`` and ``2 * seed + 1``.
    (The vocabulary is small, so a query text may occur in both; the pairs are drawn independently.)"""
    return (generate_records(n_train, seed=2 * seed, long_pages=long_pages),
            generate_records(n_eval, seed=2 * seed + 1, long_pages=long_pages))


# ---------------------------------------------------------------------------------------------
# tokenizer and backbone
# ---------------------------------------------------------------------------------------------


def word_level_tokenizer(texts: Iterable[str], *, lowercase: bool = False):
    """A word-level ``PreTrainedTokenizerFast`` trained in-process (offline) on ``texts``.

    Every word and punctuation run of ``texts`` gets an id (``pre_tokenizers.Whitespace``: ``\\w+``
    or ``[^\\w\\s]+``); other words map to ``<unk>``. Ids: ``<pad>`` 0, ``<unk>`` 1, ``</s>`` 2 (the
    EOS), then the words. With ``lowercase`` a Lowercase normalizer is set (text is matched
    case-insensitively; special tokens added later, such as UGD's, are not normalized). The UGD
    special tokens are not included: ``ugd.data.layout.add_special_tokens`` adds them.
    """
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS], min_frequency=1, show_progress=False)
    backend.train_from_iterator([t for t in texts if t], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def _prompt_words() -> str:
    prompt = LayoutConfig().prompt
    for t in SPECIAL_TOKENS.values():
        prompt = prompt.replace(t, " ")
    return prompt


def build_tokenizer(records: Iterable[dict], *, extra_texts: Iterable[str] = ()):
    """A lowercased word-level tokenizer over the records' queries, documents and reasons, the words
    of the default UGD prompt ("because ..., the correlation score is") and ``extra_texts``.

    Built offline, deterministically; ``<pad>``, ``<unk>`` and ``</s>`` (EOS) as in
    ``word_level_tokenizer``. Call ``ugd.data.layout.add_special_tokens(tok)`` before use.
    """
    texts = [_prompt_words()]
    for r in records:
        texts += [r.get("query") or "", r.get("document") or "", r.get("reason") or ""]
    texts += list(extra_texts)
    return word_level_tokenizer(texts, lowercase=True)


BACKBONE_FAMILIES = ("qwen2", "llama")


def tiny_backbone_config(vocab_size: int, *, family: str = "qwen2", **overrides):
    """A tiny decoder config (hidden 128, 2 layers, 4 heads, 2 KV heads, MLP 256, 512 positions, tied
    embeddings) that trains on a CPU in minutes. ``family``: "qwen2" (``Qwen2Config``) or "llama"
    (``LlamaConfig``). Token ids follow ``word_level_tokenizer``: pad 0, eos 2, no BOS. ``overrides``
    replace any field."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 4:
        raise ValueError(f"vocab_size must be an int >= 4, got {vocab_size!r}")
    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if family not in classes:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {BACKBONE_FAMILIES}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return classes[family](**kwargs)


__all__ = [
    "CATEGORIES",
    "LABEL_NAMES",
    "NUM_LABELS",
    "build_tokenizer",
    "demo_splits",
    "generate_records",
    "tiny_backbone_config",
    "word_level_tokenizer",
]
