"""The generated product catalogue that stands in for WebShop's scraped Amazon data, and its BM25 search.

Deterministic for (size, seed): the same arguments always give the same products, item codes and index.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import time
from dataclasses import dataclass

import bm25s
import numpy as np

log = logging.getLogger(__name__)

SEARCH_RETURN_N = 50  # WebShop's engine returns at most 50 hits per query
PRODUCT_WINDOW = 10  # results per page
CATEGORIES = ("beauty", "electronics", "fashion", "grocery", "home")  # like WebShop's five


@dataclass(frozen=True)
class ProductType:
    noun: str  # as written in instructions and (title-cased) in titles; also WebShop's "query" field
    category: str
    path: str  # Amazon-style breadcrumb, WebShop's "product_category"
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]]  # group -> values; a product offers at most two groups
    price: tuple[float, float]


def _t(noun: str, category: str, path: str, attributes: str, options: dict[str, str],
       price: tuple[float, float]) -> ProductType:
    return ProductType(noun, category, path, tuple(attributes.split(", ")),
                       {k: tuple(v.split(", ")) for k, v in options.items()}, price)


# Attribute strings are chosen so that no two are fuzzy matches (token-set ratio <= 85) or substrings of each
# other, and option values never occur in a product's own text: WebShop's reward falls back to fuzzy and
# substring matching, so overlapping vocabulary would make a wrong purchase score like a right one.
PRODUCT_TYPES: tuple[ProductType, ...] = (
    # beauty
    _t("lipstick", "beauty", "Beauty & Personal Care › Makeup › Lips › Lipstick",
       "long lasting, waterproof, cruelty free, paraben free, highly pigmented, matte finish",
       {"color": "nude, berry, coral, mauve, crimson, plum, rosewood", "size": "0.12 ounce, 0.12 ounce (pack of 2)"},
       (6.0, 32.0)),
    _t("shampoo", "beauty", "Beauty & Personal Care › Hair Care › Shampoo & Conditioner › Shampoos",
       "sulfate free, color safe, volumizing, anti dandruff, cruelty free, natural ingredients",
       {"scent": "lavender, coconut, eucalyptus, rosemary mint, unscented",
        "size": "8 fl oz, 12 fl oz, 16 fl oz, 32 fl oz"}, (5.0, 38.0)),
    _t("face moisturizer", "beauty", "Beauty & Personal Care › Skin Care › Face › Creams & Moisturizers",
       "oil free, fragrance free, non comedogenic, hyaluronic acid, dermatologist tested, paraben free",
       {"size": "1.7 ounce, 2.5 ounce, 3.4 ounce", "scent": "cucumber, aloe, green tea extract, unscented"},
       (9.0, 58.0)),
    _t("nail polish", "beauty", "Beauty & Personal Care › Foot, Hand & Nail Care › Nail Art & Polish › Nail Polish",
       "quick dry, chip resistant, non toxic, long lasting, high shine, cruelty free",
       {"color": "ballet pink, cherry, midnight, lilac, champagne, emerald", "size": "0.5 fl oz, pack of 3"},
       (4.0, 24.0)),
    _t("hair dryer", "beauty", "Beauty & Personal Care › Hair Care › Styling Tools & Appliances › Hair Dryers",
       "ionic technology, lightweight, fast drying, low noise, foldable handle, cool shot button",
       {"color": "black, white, rose gold, teal"}, (19.0, 120.0)),
    # electronics
    _t("wireless earbuds", "electronics", "Electronics › Headphones, Earbuds & Accessories › Earbuds",
       "noise cancelling, bluetooth 5.3, water resistant, long battery life, fast charging, touch control",
       {"color": "black, white, navy, graphite, sage", "style": "standard, pro, sport"}, (15.0, 150.0)),
    _t("wall charger", "electronics",
       "Electronics › Cell Phones & Accessories › Chargers & Power Adapters › Wall Chargers",
       "fast charging, foldable plug, compact design, overheat protection, dual port",
       {"size": "20w, 35w, 65w, 100w", "color": "black, white"}, (9.0, 60.0)),
    _t("hdmi cable", "electronics", "Electronics › Computers & Accessories › Cables & Accessories › HDMI Cables",
       "high speed, 4k 120hz, gold plated connectors, braided cord, ethernet channel",
       {"size": "3 feet, 6 feet, 10 feet, 15 feet", "color": "black, grey"}, (5.0, 30.0)),
    _t("bluetooth speaker", "electronics", "Electronics › Portable Audio & Video › Portable Bluetooth Speakers",
       "waterproof, long battery life, deep bass, built in microphone, portable, stereo pairing",
       {"color": "black, blue, red, camo, sand"}, (18.0, 140.0)),
    _t("wireless mouse", "electronics", "Electronics › Computers & Accessories › Computer Accessories › Mice",
       "ergonomic design, silent click, rechargeable, plug and play, adjustable dpi, compact design",
       {"color": "black, white, pink, space grey"}, (8.0, 55.0)),
    # fashion
    _t("t-shirt", "fashion", "Clothing, Shoes & Jewelry › Men › Clothing › Shirts › T-Shirts",
       "machine washable, moisture wicking, short sleeve, slim fit, crew neck, tagless",
       {"color": "black, white, navy, heather grey, olive, burgundy",
        "size": "small, medium, large, x-large, xx-large"}, (8.0, 35.0)),
    _t("running shoes", "fashion", "Clothing, Shoes & Jewelry › Women › Shoes › Athletic › Running",
       "non slip, mesh upper, arch support, rubber sole, lightweight, memory foam insole",
       {"size": "6, 6.5, 7, 7.5, 8, 8.5, 9, 10", "color": "black, white, coral, grey, lavender"},
       (25.0, 130.0)),
    _t("hoodie", "fashion", "Clothing, Shoes & Jewelry › Men › Clothing › Fashion Hoodies & Sweatshirts",
       "fleece lined, machine washable, kangaroo pocket, relaxed fit, long sleeve, zip up",
       {"color": "black, charcoal, forest green, maroon, oatmeal", "size": "small, medium, large, x-large"},
       (18.0, 65.0)),
    _t("yoga leggings", "fashion", "Clothing, Shoes & Jewelry › Women › Clothing › Active › Leggings",
       "high waist, tummy control, four way stretch, squat proof, moisture wicking, side pockets",
       {"color": "black, dusty rose, navy, plum, olive", "size": "x-small, small, medium, large, x-large"},
       (14.0, 58.0)),
    _t("crossbody bag", "fashion", "Clothing, Shoes & Jewelry › Women › Handbags & Wallets › Crossbody Bags",
       "adjustable strap, vegan leather, multiple pockets, rfid blocking, zipper closure",
       {"color": "black, tan, cognac, ivory, burgundy"}, (15.0, 90.0)),
    # grocery
    _t("granola", "grocery", "Grocery & Gourmet Food › Breakfast Foods › Cereals › Granola",
       "gluten free, non gmo, high protein, low sugar, whole grain, kosher",
       {"flavor name": "honey almond, cinnamon raisin, dark cocoa, maple pecan",
        "size": "12 ounce (pack of 1), 12 ounce (pack of 3), 24 ounce"}, (4.0, 28.0)),
    _t("coffee beans", "grocery", "Grocery & Gourmet Food › Beverages › Coffee, Tea & Cocoa › Whole Coffee Beans",
       "organic, fair trade, single origin, small batch, low acid",
       {"flavor name": "light roast, medium roast, dark roast, espresso", "size": "12 ounce, 2 pound, 5 pound"},
       (9.0, 60.0)),
    _t("green tea", "grocery", "Grocery & Gourmet Food › Beverages › Coffee, Tea & Cocoa › Tea › Green",
       "organic, unsweetened, individually wrapped, non gmo, antioxidant rich",
       {"flavor name": "jasmine, peppermint, lemon ginger, original", "size": "20 count, 40 count, 100 count"},
       (4.0, 25.0)),
    _t("protein bar", "grocery", "Grocery & Gourmet Food › Snack Foods › Bars › Protein Bars",
       "high protein, gluten free, low sugar, keto friendly, plant based",
       {"flavor name": "peanut butter, cookie dough, salted caramel, birthday cake, mint chocolate",
        "size": "12 count, 24 count"}, (12.0, 45.0)),
    _t("olive oil", "grocery", "Grocery & Gourmet Food › Pantry Staples › Oils, Vinegars & Salad Dressings › Olive",
       "extra virgin, cold pressed, organic, first harvest, non gmo",
       {"size": "500 ml, 750 ml, 1 liter, 3 liter"}, (8.0, 48.0)),
    # home
    _t("throw pillow cover", "home", "Home & Kitchen › Bedding › Decorative Pillows, Inserts & Covers › Covers",
       "machine washable, hidden zipper, soft velvet, double sided, fade resistant",
       {"color": "mustard, navy, blush, sage, cream, rust", "size": "16 x 16 inch, 18 x 18 inch, 20 x 20 inch"},
       (8.0, 32.0)),
    _t("cutting board", "home", "Home & Kitchen › Kitchen & Dining › Kitchen Utensils & Gadgets › Cutting Boards",
       "easy to clean, dishwasher safe, non slip, bpa free, juice groove, reversible",
       {"size": "12 x 8 inch, 15 x 10 inch, 18 x 12 inch", "style": "single, set of 3"}, (10.0, 55.0)),
    _t("sheet set", "home", "Home & Kitchen › Bedding › Sheets & Pillowcases › Sheet & Pillowcase Sets",
       "deep pocket, wrinkle free, hypoallergenic, machine washable, breathable, cooling",
       {"size": "twin, full, queen, king", "color": "white, grey, navy, sage, taupe"}, (20.0, 95.0)),
    _t("scented candle", "home", "Home & Kitchen › Home Décor Products › Candles & Holders › Candles",
       "long lasting, soy wax, lead free wick, hand poured, gift ready",
       {"scent": "lavender, vanilla, sandalwood, fresh linen, sea salt", "size": "8 oz, 14 oz, 22 oz"},
       (9.0, 45.0)),
    _t("desk lamp", "home", "Home & Kitchen › Lighting & Ceiling Fans › Lamps & Shades › Desk Lamps",
       "dimmable, eye caring, usb charging port, touch control, adjustable arm, energy saving",
       {"color": "black, white, silver, walnut"}, (14.0, 70.0)),
)

BRANDS = {
    "beauty": ("Lumora", "Velisse", "Aurelle", "Nuvana", "Sorelle", "Kaiya", "Bellami", "Odessi"),
    "electronics": ("Voltix", "Zentra", "Arkon", "Novatek", "Sonique", "Quorra", "Helix", "Ampero"),
    "fashion": ("Marlowe", "Threadly", "Corvo", "Wildmoor", "Stridewell", "Juniper", "Halden", "Ostera"),
    "grocery": ("Orchardia", "Pantryco", "Goldgrain", "Nutrisa", "Meadowbrook", "Solana", "Fieldhouse", "Verde"),
    "home": ("Hearthly", "Casabell", "Nestwell", "Oakmere", "Lunaro", "Dovetail", "Kindling", "Mossway"),
}
# Plain words that dress up titles; none is an attribute or an option value.
EPITHETS = ("Premium", "Everyday", "Essential", "Signature", "Ultra", "Classic", "Modern", "Deluxe")
TAILS = ("Gift for Him or Her", "Value Pack", "New Edition", "Best Seller", "Made to Last", "Home and Travel")

# Why an attribute matters, for feature bullets; generic text for attributes without their own line.
FEATURE_REASONS = (
    "designed for everyday use", "tested to keep its quality over time", "a favourite of our customers",
    "checked by our quality team before shipping", "part of what sets it apart",
)
REVIEW_TITLES = ("Exactly what I wanted", "Great value", "Would buy again", "Does the job", "Pleasantly surprised",
                 "Not bad", "Good but not perfect")
REVIEW_BODIES = (
    "I use this {noun} every day and it still looks new.",
    "The {noun} arrived quickly and was well packed.",
    "Good quality for the price. The {attr} part is true.",
    "My second {noun} from {brand}; I like it as much as the first.",
    "It is fine, though I expected a bit more for the money.",
)


# Stands in for spaCy's noun tagging in WebShop's type reward: the nouns a title can contain are the type
# nouns and the brand names (proper nouns).
NOUNS = frozenset(w for kind in PRODUCT_TYPES for w in re.findall(r"[a-z0-9]+", kind.noun)) | frozenset(
    b.lower() for brands in BRANDS.values() for b in brands)


@dataclass(frozen=True)
class Review:
    title: str
    score: int
    body: str


@dataclass(frozen=True)
class Product:
    asin: str
    category: str
    query: str  # the product type's noun, like WebShop's search query the product was collected with
    product_category: str
    title: str
    brand: str
    price: float
    attributes: tuple[str, ...]
    title_attributes: tuple[str, ...]  # the attributes readable in the title
    options: dict[str, tuple[str, ...]]
    description: str
    features: tuple[str, ...]
    reviews: tuple[Review, ...]
    rating: str

    @property
    def price_tag(self) -> str:
        return f"${self.price:.2f}"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


STOPWORDS = frozenset(
    "a an and are as at be by for from i i'm im in is it looking me need of on or price than that the this "
    "to want with would like dollars lower find".split()
)


def search_tokens(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS]


ACRONYMS = frozenset(("hdmi", "usb", "rfid", "bpa", "gmo", "dpi"))


def _title_case(phrase: str) -> str:
    return " ".join(w.upper() if w in ACRONYMS else w if any(c.isdigit() for c in w) else w[:1].upper() + w[1:]
                    for w in phrase.split())


def _asin(rng: random.Random, taken: set[str]) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    while True:
        code = "B0" + "".join(rng.choice(alphabet) for _ in range(8))
        if code not in taken:
            taken.add(code)
            return code


def _make_product(rng: random.Random, kind: ProductType, asin: str, n_groups: int) -> Product:
    brand = rng.choice(BRANDS[kind.category])
    attributes = tuple(rng.sample(kind.attributes, rng.randint(3, min(5, len(kind.attributes)))))
    title_attributes = attributes[: rng.randint(2, 3)]
    noun = _title_case(kind.noun)
    shown = [_title_case(a) for a in title_attributes]
    form = rng.randrange(4)
    if form == 0:
        title = f"{brand} {' '.join(shown)} {noun}, {rng.choice(TAILS)}"
    elif form == 1:
        title = f"{noun} by {brand} | {', '.join(shown)}"
    elif form == 2:
        title = f"{brand} {rng.choice(EPITHETS)} {noun} - {' & '.join(shown)}"
    else:
        title = f"{brand} {shown[0]} {noun} with {' and '.join(shown[1:])}, {rng.choice(TAILS)}"

    lo, hi = kind.price
    price = round(int(rng.uniform(lo, hi)) + rng.choice((0.99, 0.49, 0.95, 0.0)), 2)
    features = tuple(f"{a.upper()}: {rng.choice(FEATURE_REASONS)}" for a in attributes)
    description = (
        f"The {brand} {kind.noun} is {', '.join(attributes[:-1])} and {attributes[-1]}. "
        f"{rng.choice(('Made with care', 'Built for daily routines', 'Loved by thousands'))}, "
        f"it comes from {rng.choice(('a family', 'an independent', 'a trusted'))} brand."
    )
    text = f"{title} {description} {' '.join(features)}".lower()
    options: dict[str, tuple[str, ...]] = {}
    for group in sorted(rng.sample(sorted(kind.options), min(n_groups, len(kind.options)))):
        values = kind.options[group]
        picked = sorted(rng.sample(range(len(values)), rng.randint(min(3, len(values)), len(values))))
        # A value that also occurs in the product's own text would match by WebShop's substring fallback.
        kept = tuple(values[i] for i in picked if values[i] not in text)
        if len(kept) >= 2:
            options[group] = kept
    reviews = tuple(
        Review(rng.choice(REVIEW_TITLES), rng.randint(2, 5),
               rng.choice(REVIEW_BODIES).format(noun=kind.noun, attr=rng.choice(attributes), brand=brand))
        for _ in range(rng.randint(1, 3))
    )
    rating = "N.A." if rng.random() < 0.2 else f"{rng.choice((3.5, 4.0, 4.5, 5.0, 4.2, 4.7))}"
    return Product(asin=asin, category=kind.category, query=kind.noun, product_category=kind.path, title=title,
                   brand=brand, price=price, attributes=attributes, title_attributes=title_attributes,
                   options=options, description=description, features=features, reviews=reviews,
                   rating=rating)


class Catalogue:
    """Products, the split each belongs to (as a purchase target), and BM25 search over them."""

    def __init__(self, products: list[Product], splits: dict[str, str]) -> None:
        self.products = products
        self.by_asin = {p.asin: p for p in products}
        self.split_of = splits
        # WebShop indexes titles with more product text; titles, attributes and breadcrumbs are enough here.
        corpus = [search_tokens(f"{p.title} {' '.join(p.attributes)} {p.product_category}") for p in products]
        self._bm25 = bm25s.BM25()
        self._bm25.index(corpus, show_progress=False)
        self._vocab = self._bm25.vocab_dict

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[Product]:
        """The top `k` products with a positive BM25 score; ties keep catalogue order, so results are stable."""
        tokens = [t for t in search_tokens(query) if t in self._vocab]
        if not tokens:
            return []
        scores = np.asarray(self._bm25.get_scores(tokens), dtype=np.float64)
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        return [self.products[i] for i in order if scores[i] > 0]


def _assign_splits(products: list[Product], rng: random.Random) -> dict[str, str]:
    # Stratified by product type, so every split has targets of every type and option count.
    by_type: dict[str, list[Product]] = {}
    for p in products:
        by_type.setdefault(p.query, []).append(p)
    splits: dict[str, str] = {}
    for group in by_type.values():
        order = list(group)
        rng.shuffle(order)
        n_val = max(1, round(0.1 * len(order)))
        for i, p in enumerate(order):
            splits[p.asin] = "val" if i < n_val else "test" if i < 2 * n_val else "train"
    return splits


@functools.lru_cache(maxsize=4)
def build_catalogue(size: int = 1000, seed: int = 0) -> Catalogue:
    """`size` products over all types (types round-robin, option groups 0/1/2 in turn), deterministic."""
    if size < 3 * len(PRODUCT_TYPES):
        raise ValueError(f"a catalogue needs at least {3 * len(PRODUCT_TYPES)} products, got {size}")
    start = time.perf_counter()
    rng = random.Random(f"webshop-catalogue/{seed}")
    taken: set[str] = set()
    titles: set[str] = set()
    products: list[Product] = []
    for i in range(size):
        kind = PRODUCT_TYPES[i % len(PRODUCT_TYPES)]
        n_groups = (i // len(PRODUCT_TYPES)) % 3
        while True:  # titles are unique, like listings on a real shop
            product = _make_product(rng, kind, _asin(rng, taken), n_groups)
            if product.title not in titles:
                break
        titles.add(product.title)
        products.append(product)
    catalogue = Catalogue(products, _assign_splits(products, rng))
    log.info("webshop catalogue: %d products (seed %d) in %.2f s", size, seed, time.perf_counter() - start)
    return catalogue
