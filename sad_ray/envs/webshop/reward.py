"""WebShop's purchase reward (web_agent_site/engine/goal.py `get_reward`), rebuilt for the generated catalogue.

r = r_type * (n_att_matched + n_opt_matched + r_price) / (n_att + n_opt + 1): type similarity gates a score
that counts goal attributes found in the product, chosen options that match the goal, and the price bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any

from sad_ray.envs.webshop.catalogue import NOUNS, Product, words

EXACT_MATCH_OPTS = ("size",)  # WebShop matches sizes exactly, other options fuzzily
FUZZY_THRESHOLD = 85
PRICE_RANGE = [10.0 * i for i in range(1, 100)]


@dataclass(frozen=True)
class Goal:
    """What the instruction asks for, with the fields of the target product the type reward compares."""

    asin: str  # the product the goal was written from (any product meeting it scores 1.0)
    category: str
    query: str
    product_category: str
    name: str  # the target's title
    noun: str
    attributes: tuple[str, ...]
    goal_options: dict[str, str] = field(default_factory=dict)
    price_upper: float = 1_000_000.0
    instruction_text: str = ""


def _ratio(a: str, b: str) -> float:
    return 100.0 * SequenceMatcher(None, a, b).ratio()


def token_set_ratio(a: str, b: str) -> float:
    """thefuzz's token_set_ratio (0-100): 100 when one phrase's words are a subset of the other's."""
    ta, tb = set(words(a)), set(words(b))
    if not ta or not tb:
        return 0.0
    common = " ".join(sorted(ta & tb))
    only_a, only_b = " ".join(sorted(ta - tb)), " ".join(sorted(tb - ta))
    if common and (not only_a or not only_b):
        return 100.0
    full_a, full_b = f"{common} {only_a}".strip(), f"{common} {only_b}".strip()
    return max(_ratio(common, full_a), _ratio(common, full_b), _ratio(full_a, full_b))


def _text_fields(product: Product) -> tuple[str, str, str]:
    return product.title.lower(), " ".join(product.features).lower(), product.description.lower()


def type_reward(product: Product, goal: Goal) -> dict[str, Any]:
    query_match = product.query == goal.query
    bought_path = {x.strip() for x in product.product_category.split("›")}
    goal_path = {x.strip() for x in goal.product_category.split("›")}
    category_match = len(bought_path & goal_path) >= 2
    bought_nouns = {w for w in words(product.title) if w in NOUNS}
    goal_nouns = {w for w in words(goal.name) if w in NOUNS}
    title_score = len(bought_nouns & goal_nouns) / len(goal_nouns) if goal_nouns else 0.2
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return {"r_type": r_type, "query_match": query_match, "category_match": category_match,
            "title_score": title_score}


def attribute_reward(product: Product, goal: Goal) -> tuple[float, int]:
    texts = _text_fields(product)
    matches = 0
    for g_attr in goal.attributes:
        if any(token_set_ratio(p_attr, g_attr) > FUZZY_THRESHOLD for p_attr in product.attributes) or any(
                g_attr in t for t in texts):
            matches += 1
    return (matches / len(goal.attributes) if goal.attributes else 0.0), matches


def option_reward(product: Product, goal_options: list[str], chosen: dict[str, str]) -> tuple[float | None, int]:
    goal_values = [o.lower().strip() for o in goal_options]
    texts = _text_fields(product)
    matches = 0
    # Like WebShop, this counts chosen options that match some goal option, so choosing none scores zero.
    for name, value in chosen.items():
        value = value.lower().strip()
        if name.lower() in EXACT_MATCH_OPTS:
            matched = value in goal_values
        else:
            matched = any(token_set_ratio(g, value) > FUZZY_THRESHOLD for g in goal_values)
        if matched or any(value in t for t in texts):
            matches += 1
    # Capped so that an extra option group that happens to match cannot lift a purchase above 1.0.
    matches = min(matches, len(goal_values))
    return (matches / len(goal_values) if goal_values else None), matches


def get_reward(product: Product, goal: Goal, options: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """The reward for buying `product` with the `options` chosen, and its parts (WebShop's verbose info)."""
    r_type = type_reward(product, goal)
    r_price = product.price <= goal.price_upper
    r_att, n_att = attribute_reward(product, goal)
    r_option, n_opt = option_reward(product, list(goal.goal_options.values()), options)
    denominator = len(goal.attributes) + len(goal.goal_options) + 1
    total = r_type["r_type"] * (n_att + n_opt + float(r_price)) / denominator
    info = {**r_type, "r_att": r_att, "r_price": r_price, "w_att": len(goal.attributes) / denominator,
            "w_price": 1 / denominator}
    if r_option is not None:
        info["r_option"] = r_option
        info["w_option"] = len(goal.goal_options) / denominator
    return total, info


def price_upper_bound(price: float, rng: Any) -> float:
    """WebShop's bound: the larger of two of the four multiples of ten above the price."""
    above = [p for p in PRICE_RANGE if p > price][:4]
    return max(rng.sample(above, 2)) if len(above) >= 2 else 1_000_000.0
