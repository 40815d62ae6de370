"""Versioned prompt templates, one per domain, rendered into chat messages for vLLM's `LLM.chat`.

A template gives the item's title and any metadata columns of items.arrow and asks for the attributes of
`schema.ATTRIBUTE_SCHEMA`. The prompt version written to attributes.arrow is a hash of everything that
shapes the model's input and its constraint (template text, domain wording, schema), so tables made with
different prompts are never mixed by a resumed run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
from typing import Any, Mapping

from enrich import schema as schema_lib

TEMPLATE_VERSION = "v1"
MAX_TITLE_CHARS = 300
MAX_META_CHARS = 200

SYSTEM = ("You are a product catalogue annotator for a recommender system. You read one item and answer "
          "with a single JSON object of short attributes. Use only what the title and metadata suggest; "
          "when something cannot be inferred, give your best short guess, and 'unknown' for price_tier.")

USER = ("Item domain: {domain_desc}\n"
        "Title: {title}\n"
        "{metadata}"
        "Answer with the JSON attributes of this {noun}.")


@dataclasses.dataclass(frozen=True)
class DomainTemplate:
    """Per-domain wording of the shared template and its worked examples (few-shot chat turns).

    Examples matter for small models: with a field-by-field instruction instead, SmolLM2-135M copied the
    instruction text into the fields; with two worked examples per domain every output of a 24-item
    abxi-food-kitchen sample was schema-valid (see docs/enrich.md).
    """

    desc: str                                            # e.g. "Amazon grocery and gourmet food"
    noun: str                                            # what one item is called
    examples: tuple[tuple[str, dict[str, Any]], ...] = ()  # (title, attributes) pairs, schema-valid


def _ex(title: str, category: str, themes: list[str], usage: str, audience: str, interests: list[str],
        price: str) -> tuple[str, dict[str, Any]]:
    return title, {"category": category, "themes": themes, "usage_context": usage, "audience": audience,
                   "related_interests": interests, "price_tier": price}


# Known domains by keyword (matched case-insensitively against the domain name of items.arrow).
DOMAINS: dict[str, DomainTemplate] = {
    "food": DomainTemplate("Amazon grocery and gourmet food", "food product", (
        _ex("Lipton Green Tea Bags, 100 Count", "green tea", ["tea", "healthy drink"],
            "hot drink at breakfast or at work", "everyday tea drinkers", ["herbal tea", "wellness"], "budget"),
        _ex("Bob's Red Mill Organic Quinoa Flour, 22 Ounce", "baking flour", ["gluten free", "organic"],
            "baking bread and pancakes at home", "health-minded bakers", ["whole grains", "gluten-free recipes"],
            "mid-range"))),
    "kitchen": DomainTemplate("Amazon home and kitchen", "home and kitchen product", (
        _ex("OXO Good Grips Salad Spinner, Large", "kitchen tool", ["salad prep", "easy cleaning"],
            "washing and drying greens before meals", "home cooks", ["healthy cooking", "meal prep"], "mid-range"),
        _ex("Lodge 10.25 Inch Cast Iron Skillet", "cookware", ["cast iron", "durable"],
            "searing and baking on stove or oven", "home cooks", ["camping cooking", "southern recipes"], "budget"))),
    "movie": DomainTemplate("movies and TV", "movie", (
        _ex("The Princess Bride (1987)", "fantasy comedy", ["adventure", "romance"], "family movie night",
            "families and fans of classic films", ["fairy tales", "quotable comedies"], "unknown"),
        _ex("Planet Earth: The Complete Series [Blu-ray]", "nature documentary", ["wildlife", "cinematography"],
            "relaxed evening viewing", "nature lovers", ["travel", "science"], "mid-range"))),
    "book": DomainTemplate("books", "book", (
        _ex("The Hobbit by J.R.R. Tolkien", "fantasy novel", ["quest", "dragons"], "reading for pleasure",
            "young and adult fantasy readers", ["epic fantasy", "mythology"], "budget"),
        _ex("Salt, Fat, Acid, Heat: Mastering the Elements of Good Cooking", "cookbook", ["technique", "flavor"],
            "learning to cook at home", "home cooks", ["food science", "recipes"], "mid-range"))),
    "beauty": DomainTemplate("Amazon beauty", "beauty product", (
        _ex("CeraVe Moisturizing Cream, 16 oz", "skincare", ["hydration", "sensitive skin"], "daily after washing",
            "people with dry skin", ["dermatology", "self care"], "budget"),
        _ex("Chanel No. 5 Eau de Parfum Spray, 3.4 oz", "fragrance", ["floral", "classic"], "evenings and events",
            "women who like luxury scents", ["fashion", "luxury brands"], "premium"))),
    "electronics": DomainTemplate("Amazon electronics", "electronics product", (
        _ex("Anker USB-C Charging Cable, 6 ft", "cable", ["charging", "durable"], "charging a phone at home or work",
            "smartphone owners", ["gadgets", "travel"], "budget"),
        _ex("Sony WH-1000XM4 Wireless Noise Cancelling Headphones", "headphones", ["noise cancelling", "wireless"],
            "listening on flights and commutes", "music lovers and travellers", ["audio", "travel"], "premium"))),
}


def domain_template(domain: str) -> DomainTemplate:
    """The template for a domain name; unknown domains get a generic wording that names the domain."""
    low = domain.lower()
    for key, tpl in DOMAINS.items():
        if key in low:
            return tpl
    return DomainTemplate(f"{domain}", f"{domain} item")


def prompt_version(domain: str, schema: dict[str, Any] = schema_lib.ATTRIBUTE_SCHEMA) -> str:
    """12-hex-digit hash of the template, the domain's wording and the schema."""
    tpl = domain_template(domain)
    blob = "\x1f".join([TEMPLATE_VERSION, SYSTEM, USER, tpl.desc, tpl.noun, json.dumps(tpl.examples, sort_keys=True),
                        schema_lib.schema_json(schema)])
    return f"{TEMPLATE_VERSION}-{hashlib.sha256(blob.encode('utf-8')).hexdigest()[:12]}"


def clean_text(value: Any, limit: int) -> str | None:
    """Unescapes HTML entities (Amazon titles carry '&amp;'), collapses whitespace, truncates; None when blank."""
    if value is None:
        return None
    text = " ".join(html.unescape(str(value)).split())
    if not text:
        return None
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def render_metadata(metadata: Mapping[str, Any]) -> str:
    """'Name: value' lines for the non-blank metadata values, in column order."""
    lines = []
    for key, value in metadata.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value if v is not None)
        text = clean_text(value, MAX_META_CHARS)
        if text is not None:
            lines.append(f"{key.replace('_', ' ').capitalize()}: {text}\n")
    return "".join(lines)


def _user(tpl: DomainTemplate, title: str, metadata: Mapping[str, Any]) -> str:
    return USER.format(domain_desc=tpl.desc, title=title, metadata=render_metadata(metadata), noun=tpl.noun)


def render_messages(domain: str, title: str, metadata: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """The chat messages for one item: system, the domain's worked examples (user/assistant turns), then the
    item's user turn. vLLM applies the model's chat template to them."""
    tpl = domain_template(domain)
    text = clean_text(title, MAX_TITLE_CHARS)
    if text is None:
        raise ValueError("render_messages: the item has no title (use the missing_title fallback)")
    messages = [{"role": "system", "content": SYSTEM}]
    for ex_title, ex_attrs in tpl.examples:
        messages += [{"role": "user", "content": _user(tpl, ex_title, {})},
                     {"role": "assistant", "content": json.dumps(ex_attrs)}]
    messages.append({"role": "user", "content": _user(tpl, text, metadata or {})})
    return messages


def embedding_text(domain: str, title: str | None, attributes: Mapping[str, Any] | None,
                   metadata: Mapping[str, Any] | None = None) -> str:
    """The text that is embedded for one item: title, metadata and attributes, one 'Field: value' per line.

    Items without valid attributes are embedded from title and metadata alone; items without a title from
    the domain wording and metadata ("Unknown <noun>. Domain: ..."), so every item gets a finite vector.
    """
    tpl = domain_template(domain)
    text = clean_text(title, MAX_TITLE_CHARS)
    lines = [f"Title: {text}"] if text else [f"Title: Unknown {tpl.noun}", f"Domain: {tpl.desc}"]
    lines += [ln for ln in render_metadata(metadata or {}).splitlines() if ln]
    for name in schema_lib.FIELDS:
        value = (attributes or {}).get(name)
        if value is None:
            continue
        if isinstance(value, list):
            value = ", ".join(value)
        lines.append(f"{name.replace('_', ' ').capitalize()}: {value}")
    return "\n".join(lines)
