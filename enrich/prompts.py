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
        "Describe this {noun} with these fields:\n"
        "- category: its {category_hint}\n"
        "- themes: 1 to 3 short themes or styles\n"
        "- usage_context: when or how it is {used}\n"
        "- audience: who typically {buys}\n"
        "- related_interests: 1 to 3 interests of people who like it\n"
        "- price_tier: one of budget, mid-range, premium, unknown")


@dataclasses.dataclass(frozen=True)
class DomainTemplate:
    """Per-domain wording of the shared template."""

    desc: str            # e.g. "Amazon grocery and gourmet food"
    noun: str            # what one item is called
    category_hint: str   # what "category" means in this domain
    used: str            # "used", "eaten or cooked", "watched", ...
    buys: str            # "buys it", "watches it", ...


# Known domains by keyword (matched case-insensitively against the domain name of items.arrow).
DOMAINS: dict[str, DomainTemplate] = {
    "food": DomainTemplate("Amazon grocery and gourmet food", "food product", "food category (e.g. snack, tea, spice)",
                           "eaten, drunk or cooked", "buys it"),
    "kitchen": DomainTemplate("Amazon home and kitchen", "home and kitchen product",
                              "product category (e.g. cookware, storage, appliance)", "used", "buys it"),
    "movie": DomainTemplate("movies and TV", "movie", "genre", "watched", "watches it"),
    "book": DomainTemplate("books", "book", "genre", "read", "reads it"),
    "beauty": DomainTemplate("Amazon beauty", "beauty product", "product category (e.g. skincare, fragrance)",
                             "used", "buys it"),
    "electronics": DomainTemplate("Amazon electronics", "electronics product",
                                  "product category (e.g. audio, cable, camera)", "used", "buys it"),
}


def domain_template(domain: str) -> DomainTemplate:
    """The template for a domain name; unknown domains get a generic wording that names the domain."""
    low = domain.lower()
    for key, tpl in DOMAINS.items():
        if key in low:
            return tpl
    return DomainTemplate(f"{domain}", f"{domain} item", "category", "used", "uses it")


def prompt_version(domain: str, schema: dict[str, Any] = schema_lib.ATTRIBUTE_SCHEMA) -> str:
    """12-hex-digit hash of the template, the domain's wording and the schema."""
    tpl = domain_template(domain)
    blob = "\x1f".join([TEMPLATE_VERSION, SYSTEM, USER, repr(dataclasses.astuple(tpl)), schema_lib.schema_json(schema)])
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


def render_messages(domain: str, title: str, metadata: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """The chat messages for one item (system + user); vLLM applies the model's chat template to them."""
    tpl = domain_template(domain)
    text = clean_text(title, MAX_TITLE_CHARS)
    if text is None:
        raise ValueError("render_messages: the item has no title (use the missing_title fallback)")
    user = USER.format(domain_desc=tpl.desc, title=text, metadata=render_metadata(metadata or {}), noun=tpl.noun,
                       category_hint=tpl.category_hint, used=tpl.used, buys=tpl.buys)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def embedding_text(domain: str, title: str | None, attributes: Mapping[str, Any] | None,
                   metadata: Mapping[str, Any] | None = None) -> str:
    """The text that is embedded for one item: title, metadata and attributes, one 'Field: value' per line.

    Items without valid attributes are embedded from title and metadata alone; items without a title from
    the domain wording and metadata ("Unknown <noun>"), so every item gets a finite vector.
    """
    tpl = domain_template(domain)
    lines = [f"Title: {clean_text(title, MAX_TITLE_CHARS) or 'Unknown ' + tpl.noun}", f"Domain: {tpl.desc}"]
    lines += [ln for ln in render_metadata(metadata or {}).splitlines() if ln]
    for name in schema_lib.FIELDS:
        value = (attributes or {}).get(name)
        if value is None:
            continue
        if isinstance(value, list):
            value = ", ".join(value)
        lines.append(f"{name.replace('_', ' ').capitalize()}: {value}")
    return "\n".join(lines)
