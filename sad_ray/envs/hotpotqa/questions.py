"""Multi-hop questions of HotPotQA's two kinds (bridge, comparison) over the stand-in corpus, or real ones from JSON.

Every question keeps its gold answer and its hops: the pages to read, in order, with the supporting sentences
on each. Splits partition questions by a stable hash; test bridge entities are kept out of train and val.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from sad_ray.envs.base import SPLITS
from sad_ray.envs.hotpotqa.corpus import SEARCH_SENTENCES, Corpus, Page, fold, title_key
from sad_ray.envs.hotpotqa.geo import City, Country, GeoWorld, cap, coordinate, join_list, number, the

log = logging.getLogger(__name__)

TASK_TYPES = ("bridge", "comparison")
# Keeps pools balanced across templates and cheap to build; each split still gets hundreds per template.
MAX_PER_TEMPLATE = 1500
# Lookup keywords for the facts a search summary may not show; each hits its fact's sentence first.
KEYWORDS = {"currency": "currency", "language": "official language", "calling": "calling code", "borders": "borders"}


@dataclass(frozen=True)
class Hop:
    """One page to read: its title, the supporting sentences on it, and (for the expert) why and what it gives."""

    title: str
    sentences: tuple[int, ...]
    keyword: str | None = None  # lookup keyword for supporting sentences the search summary does not show
    need: str = ""  # "the currency of Australia"
    fact: str = ""  # "the currency of Australia is the Australian dollar"
    query: str | None = None  # the name the question uses, when the page's title is a disambiguated one


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str
    type: str  # bridge | comparison
    hops: tuple[Hop, ...]
    template: str = "hotpotqa"
    split_key: str = ""
    bridge_entity: str | None = None  # the page a bridge question pivots on (kept out of other splits)
    goal: str = ""  # what is finally asked, without naming the bridge: "the currency of that country"
    conclusions: tuple[str, ...] = ()  # final-thought variants; empty for real HotPotQA questions

    @property
    def supporting_facts(self) -> list[tuple[str, int]]:
        return [(hop.title, i) for hop in self.hops for i in hop.sentences]


def split_of(key: str) -> str:
    """15% test, 10% val, 75% train, by a hash that is stable across processes and Python versions."""
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "test" if bucket < 15 else "val" if bucket < 25 else "train"


def _pick(rng: random.Random, phrasings: Sequence[str], **slots: str) -> str:
    return rng.choice(phrasings).format(**slots)


def _hop(page_at: dict[str, int], title: str, fact_key: str, need: str, fact: str, query: str | None = None) -> Hop:
    return Hop(title, (page_at[fact_key],), KEYWORDS.get(fact_key), need, fact, query)


# ---- bridge templates -------------------------------------------------------------------------------------


def _capital_page(world: GeoWorld, country: Country) -> City | None:
    """The capital's city page, if a search for the capital's name opens it."""
    page = world.corpus.get(country.capital)
    return world.cities.get(page.title) if page is not None and page.title == country.capital_title else None


def _capital_bridge(world: GeoWorld, template: str, fact_key: str, phrasings: Sequence[str],
                    value: Callable[[Country], str | None], need: str, fact: str, goal: str) -> Iterator[Question]:
    """'What is the <fact> of the country whose capital is X?': X's page names the country, whose page has it."""
    for country in world.countries.values():
        city = _capital_page(world, country)
        answer = value(country)
        if city is None or answer is None or fact_key not in country.at:
            continue
        c, capital = the(country.title), city.name
        rng = random.Random(f"{template}/{country.title}")
        yield Question(
            id=f"{template}/{country.title}", type="bridge", template=template, answer=answer,
            question=_pick(rng, phrasings, capital=capital),
            hops=(_hop(city.at, city.title, "country", f"which country has {capital} as its capital",
                       f"{capital} is the capital of {c}"),
                  _hop(country.at, country.title, fact_key, need.format(c=c), fact.format(c=c, answer=answer))),
            split_key=country.title, bridge_entity=country.title, goal=goal,
            conclusions=(f"So the answer is {answer}.", f"{cap(c)} is the country whose capital is {capital}, "
                         f"so the answer is {answer}."))


def capital_currency(world: GeoWorld) -> Iterator[Question]:
    yield from _capital_bridge(
        world, "capital_currency", "currency",
        ["What is the currency of the country whose capital is {capital}?",
         "Which currency is used in the country whose capital city is {capital}?"],
        lambda c: c.currencies[0][1] if len(c.currencies) == 1 else None,
        "the currency of {c}", "the currency of {c} is the {answer}", "the currency of that country")


def capital_language(world: GeoWorld) -> Iterator[Question]:
    yield from _capital_bridge(
        world, "capital_language", "language",
        ["What is the official language of the country whose capital is {capital}?",
         "Which language is official in the country that has {capital} as its capital?"],
        lambda c: c.languages[0] if len(c.languages) == 1 else None,
        "the official language of {c}", "the official language of {c} is {answer}",
        "the official language of that country")


def capital_calling_code(world: GeoWorld) -> Iterator[Question]:
    yield from _capital_bridge(
        world, "capital_calling_code", "calling",
        ["What is the international calling code of the country whose capital is {capital}?",
         "Which telephone calling code belongs to the country with the capital {capital}?"],
        lambda c: f"+{c.calling_codes[0]}" if len(c.calling_codes) == 1 else None,
        "the calling code of {c}", "the international calling code of {c} is {answer}",
        "the calling code of that country")


def _question_cities(world: GeoWorld) -> list[City]:
    """Cities a question can name unambiguously: the page title is the plain name and a search opens it."""
    return [c for c in world.cities.values() if c.title == c.name and world.corpus.get(c.name) is not None
            and world.corpus.get(c.name).title == c.title]


def _city_country_hop(city: City) -> Hop:
    return _hop(city.at, city.title, "country", f"which country {city.name} is in",
                f"{city.name} is in {the(city.country)}")


def city_country_capital(world: GeoWorld) -> Iterator[Question]:
    template = "city_country_capital"
    for city in _question_cities(world):
        country = world.countries[city.country]
        if city.capital_of or city.name == country.capital:
            continue
        c = the(country.title)
        rng = random.Random(f"{template}/{city.title}")
        yield Question(
            id=f"{template}/{city.title}", type="bridge", template=template, answer=country.capital,
            question=_pick(rng, ["What is the capital of the country in which {city} is located?",
                                 "Which city is the capital of the country that {city} is in?"], city=city.name),
            hops=(_city_country_hop(city),
                  _hop(country.at, country.title, "capital", f"the capital of {c}",
                       f"the capital of {c} is {country.capital}")),
            split_key=country.title, bridge_entity=country.title, goal="the capital of that country",
            conclusions=(f"So the answer is {country.capital}.",
                         f"{city.name} is in {c}, and its capital is {country.capital}."))


def city_continent(world: GeoWorld) -> Iterator[Question]:
    template = "city_continent"
    for city in _question_cities(world):
        country = world.countries[city.country]
        if "continent" not in country.at:
            continue
        c = the(country.title)
        rng = random.Random(f"{template}/{city.title}")
        yield Question(
            id=f"{template}/{city.title}", type="bridge", template=template, answer=country.continent or "",
            question=_pick(rng, ["On which continent is the country that contains the city of {city}?",
                                 "The city of {city} is in a country on which continent?"], city=city.name),
            hops=(_city_country_hop(city),
                  _hop(country.at, country.title, "continent", f"the continent {c} lies on",
                       f"{c} lies on the continent of {country.continent}")),
            split_key=country.title, bridge_entity=country.title, goal="the continent that country lies on",
            conclusions=(f"So the answer is {country.continent}.",
                         f"{city.name} is in {c}, which is in {country.continent}."))


def capital_population(world: GeoWorld) -> Iterator[Question]:
    template = "capital_population"
    for country in world.countries.values():
        if country.capital_title is None:
            continue
        city = world.cities[country.capital_title]
        c, pop = the(country.title), number(city.population)
        rng = random.Random(f"{template}/{country.title}")
        yield Question(
            id=f"{template}/{country.title}", type="bridge", template=template, answer=pop,
            question=_pick(rng, ["What is the population of the capital of {c}?",
                                 "How many people live in the capital city of {c}?"], c=c),
            hops=(_hop(country.at, country.title, "capital", f"the capital of {c}",
                       f"the capital of {c} is {country.capital}"),
                  _hop(city.at, city.title, "population", f"the population of {city.name}",
                       f"{city.name} has a population of {pop}",
                       query=country.capital if city.title != country.capital else None)),
            split_key=city.title, bridge_entity=city.title, goal="the population of that city",
            conclusions=(f"So the answer is {pop}.", f"The capital of {c}, {city.name}, has {pop} inhabitants."))


def city_state_largest(world: GeoWorld) -> Iterator[Question]:
    template = "city_state_largest"
    for city in _question_cities(world):
        state = world.states.get(city.state or "")
        if state is None or state.cities[0] == city.name:
            continue
        largest = state.cities[0]
        rng = random.Random(f"{template}/{city.title}")
        yield Question(
            id=f"{template}/{city.title}", type="bridge", template=template, answer=largest,
            question=_pick(rng, ["What is the most populous city in the U.S. state where {city} is located?",
                                 "Which is the largest city of the U.S. state that {city} is in?"], city=city.name),
            hops=(_hop(city.at, city.title, "country", f"which state {city.name} is in",
                       f"{city.name} is in the U.S. state of {state.name}"),
                  _hop(state.at, state.title, "largest", f"the most populous city in {state.name}",
                       f"the most populous city in {state.name} is {largest}",
                       query=state.name if state.title != state.name else None)),
            split_key=state.title, bridge_entity=state.title, goal="the most populous city in that state",
            conclusions=(f"So the answer is {largest}.", f"{city.name} is in {state.name}, whose largest city "
                         f"is {largest}."))


def border_both(world: GeoWorld) -> Iterator[Question]:
    template = "border_both"
    countries = [c for c in world.countries.values() if c.borders]
    for a, b in combinations(countries, 2):
        common = set(a.borders) & set(b.borders)
        if len(common) != 1:
            continue
        answer = common.pop()
        rng = random.Random(f"{template}/{a.title}/{b.title}")
        if rng.random() < 0.5:
            a, b = b, a
        x, y = the(a.title), the(b.title)
        yield Question(
            id=f"{template}/{a.title}/{b.title}", type="bridge", template=template, answer=answer,
            question=_pick(rng, ["Which country borders both {x} and {y}?",
                                 "Which country shares a land border with both {x} and {y}?"], x=x, y=y),
            hops=(_hop(a.at, a.title, "borders", f"the neighbours of {x}",
                       f"{x} borders {join_list([the(n) for n in a.borders])}"),
                  _hop(b.at, b.title, "borders", f"the neighbours of {y}",
                       f"{y} borders {join_list([the(n) for n in b.borders])}")),
            split_key=answer, bridge_entity=answer,
            goal=f"the neighbours of {y} and the country on both lists",
            conclusions=(f"The only country on both lists is {the(answer)}.",
                         f"{cap(the(answer))} is the one country that borders both {x} and {y}."))


# ---- comparison templates ---------------------------------------------------------------------------------


def _pairs(items: Sequence[Any], template: str, accept: Callable[[Any, Any], bool], n: int) -> list[tuple[Any, Any]]:
    """Up to `n` distinct unordered pairs that `accept`, drawn deterministically."""
    rng = random.Random(template)
    seen: set[tuple[int, int]] = set()
    pairs = []
    for _ in range(n * 20):
        if len(pairs) >= n or len(items) < 2:
            break
        i, j = sorted(rng.sample(range(len(items)), 2))
        if (i, j) in seen or not accept(items[i], items[j]):
            continue
        seen.add((i, j))
        pairs.append((items[i], items[j]) if rng.random() < 0.5 else (items[j], items[i]))
    return pairs


def _apart(x: float, y: float) -> bool:
    """Comparisons need a clear winner: at least 10% apart."""
    return max(x, y) >= 1.1 * min(x, y)


def _compare(template: str, a_title: str, b_title: str, question: str, answer: str, hops: tuple[Hop, ...],
             conclusions: tuple[str, ...]) -> Question:
    key = "/".join(sorted((a_title, b_title)))
    return Question(id=f"{template}/{a_title}/{b_title}", question=question, answer=answer, type="comparison",
                    hops=hops, template=template, split_key=f"{template}/{key}", conclusions=conclusions)


def city_population(world: GeoWorld) -> Iterator[Question]:
    template = "city_population"
    cities = _question_cities(world)
    for a, b in _pairs(cities, template, lambda a, b: _apart(a.population, b.population), MAX_PER_TEMPLATE):
        win, lose = (a, b) if a.population > b.population else (b, a)
        rng = random.Random(f"{template}/{a.title}/{b.title}")
        hops = tuple(_hop(c.at, c.title, "population", f"the population of {c.name}",
                          f"{c.name} has a population of {number(c.population)}") for c in (a, b))
        yield _compare(template, a.title, b.title,
                       _pick(rng, ["Which city has the larger population, {a} or {b}?",
                                   "Which is more populous, {a} or {b}?"], a=a.name, b=b.name),
                       win.name, hops,
                       (f"{win.name} has more people than {lose.name}, so the answer is {win.name}.",
                        f"{number(win.population)} is more than {number(lose.population)}, so {win.name} is "
                        f"more populous."))


def _country_measure(world: GeoWorld, template: str, attr: str, phrasings: Sequence[str], unit: str,
                     more: str) -> Iterator[Question]:
    countries = list(world.countries.values())
    for a, b in _pairs(countries, template, lambda a, b: _apart(getattr(a, attr), getattr(b, attr)),
                       MAX_PER_TEMPLATE):
        win, lose = (a, b) if getattr(a, attr) > getattr(b, attr) else (b, a)
        rng = random.Random(f"{template}/{a.title}/{b.title}")
        if attr == "population":
            hops = tuple(_hop(c.at, c.title, "population", f"the population of {the(c.title)}",
                              f"{the(c.title)} has a population of {number(c.population)}") for c in (a, b))
        else:
            hops = tuple(_hop(c.at, c.title, "area", f"the area of {the(c.title)}",
                              f"{the(c.title)} covers {number(c.area)} square kilometres") for c in (a, b))
        yield _compare(template, a.title, b.title, _pick(rng, phrasings, a=the(a.title), b=the(b.title)),
                       win.title, hops,
                       (f"{number(getattr(win, attr))} {unit} is more than {number(getattr(lose, attr))}, so the "
                        f"answer is {the(win.title)}.",
                        f"{cap(the(win.title))} {more} {the(lose.title)}, so the answer is {the(win.title)}."))


def country_area(world: GeoWorld) -> Iterator[Question]:
    yield from _country_measure(world, "country_area", "area",
                                ["Which country is larger by area, {a} or {b}?",
                                 "Which covers more land, {a} or {b}?"], "square kilometres", "is larger than")


def country_population(world: GeoWorld) -> Iterator[Question]:
    yield from _country_measure(world, "country_population", "population",
                                ["Which country has more people, {a} or {b}?",
                                 "Which has the larger population, {a} or {b}?"], "people", "has more people than")


def _yes_no(template: str, items: Sequence[Any], group: Callable[[Any], str],
            differ: Callable[[Any, Any], bool] | None = None) -> list[tuple[Any, Any, bool]]:
    """Half pairs from one group (answer yes), half from groups that `differ` (answer no), drawn deterministically.

    "Yes" pairs are drawn group first: uniform random pairs would almost never share a currency.
    """
    half = MAX_PER_TEMPLATE // 2
    groups: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        groups[group(item)].append(item)
    names = sorted(g for g, members in groups.items() if len(members) > 1)
    weights = [len(groups[g]) for g in names]
    rng = random.Random(f"{template}/yes")
    seen: set[tuple[str, str]] = set()
    out: list[tuple[Any, Any, bool]] = []
    for _ in range(half * 20):
        if len(seen) >= half or not names:
            break
        a, b = rng.sample(groups[rng.choices(names, weights)[0]], 2)
        if (a.title, b.title) in seen or (b.title, a.title) in seen:
            continue
        seen.add((a.title, b.title))
        out.append((a, b, True))
    differ = differ or (lambda a, b: group(a) != group(b))
    out += [(a, b, False) for a, b in _pairs(items, f"{template}/no", differ, half)]
    return out


def same_region(world: GeoWorld) -> Iterator[Question]:
    template = "same_region"

    def region_fact(c: Country) -> str:
        region = "the Americas" if c.region == "Americas" else c.region
        return f"{the(c.title)} is in {c.subregion}, a subregion of {region}"

    # Unambiguous pairs only: the same subregion (hence region), or different regions (hence subregions).
    for a, b, yes in _yes_no(template, list(world.countries.values()), lambda c: c.subregion,
                             lambda a, b: a.region != b.region):
        rng = random.Random(f"{template}/{a.title}/{b.title}")
        x, y = the(a.title), the(b.title)
        hops = tuple(_hop(c.at, c.title, "subregion", f"the region of {the(c.title)}", region_fact(c))
                     for c in (a, b))
        conclusion = (f"Both are in {a.subregion}, so they are in the same region: yes." if yes else
                      f"{cap(x)} is in {a.region} but {y} is in {b.region}, so they are not in the same region: "
                      f"the answer is no.")
        yield _compare(template, a.title, b.title,
                       _pick(rng, ["Are {x} and {y} in the same region?",
                                   "Do {x} and {y} lie in the same region of the world?"], x=x, y=y),
                       "yes" if yes else "no", hops, (conclusion,))


def same_currency(world: GeoWorld) -> Iterator[Question]:
    template = "same_currency"
    countries = [c for c in world.countries.values() if len(c.currencies) == 1]
    for a, b, yes in _yes_no(template, countries, lambda c: c.currencies[0][0]):
        rng = random.Random(f"{template}/{a.title}/{b.title}")
        x, y = the(a.title), the(b.title)
        hops = tuple(_hop(c.at, c.title, "currency", f"the currency of {the(c.title)}",
                          f"the currency of {the(c.title)} is the {c.currencies[0][1]}") for c in (a, b))
        conclusion = (f"Both use the {a.currencies[0][1]}, so the answer is yes." if yes else
                      f"{cap(x)} uses the {a.currencies[0][1]} and {y} the {b.currencies[0][1]}, so the answer "
                      f"is no.")
        yield _compare(template, a.title, b.title,
                       _pick(rng, ["Do {x} and {y} use the same currency?",
                                   "Is the currency of {x} the same as that of {y}?"], x=x, y=y),
                       "yes" if yes else "no", hops, (conclusion,))


def same_country(world: GeoWorld) -> Iterator[Question]:
    template = "same_country"
    for a, b, yes in _yes_no(template, _question_cities(world), lambda c: c.country):
        rng = random.Random(f"{template}/{a.title}/{b.title}")
        hops = (_city_country_hop(a), _city_country_hop(b))
        conclusion = (f"Both are in {the(a.country)}, so the answer is yes." if yes else
                      f"{a.name} is in {the(a.country)} and {b.name} in {the(b.country)}, so the answer is no.")
        yield _compare(template, a.title, b.title,
                       _pick(rng, ["Are {a} and {b} in the same country?",
                                   "Are the cities of {a} and {b} located in the same country?"],
                             a=a.name, b=b.name),
                       "yes" if yes else "no", hops, (conclusion,))


def farther_north(world: GeoWorld) -> Iterator[Question]:
    template = "farther_north"
    cities = _question_cities(world)
    # At least a degree apart as the pages print them, so the comparison is never a rounding call.
    for a, b in _pairs(cities, template, lambda a, b: abs(round(a.latitude, 2) - round(b.latitude, 2)) >= 1.0,
                       MAX_PER_TEMPLATE):
        win, lose = (a, b) if a.latitude > b.latitude else (b, a)
        rng = random.Random(f"{template}/{a.title}/{b.title}")
        hops = tuple(_hop(c.at, c.title, "latitude", f"the latitude of {c.name}",
                          f"{c.name} lies at latitude {coordinate(c.latitude, 'N', 'S')}") for c in (a, b))
        yield _compare(template, a.title, b.title,
                       _pick(rng, ["Which city is farther north, {a} or {b}?",
                                   "Which lies farther north, {a} or {b}?"], a=a.name, b=b.name),
                       win.name, hops,
                       (f"{coordinate(win.latitude, 'N', 'S')} is farther north than "
                        f"{coordinate(lose.latitude, 'N', 'S')}, so the answer is {win.name}.",
                        f"So {win.name} lies farther north than {lose.name}."))


TEMPLATES: dict[str, tuple[Callable[[GeoWorld], Iterator[Question]], ...]] = {
    "bridge": (capital_currency, capital_language, capital_calling_code, city_country_capital, city_continent,
               capital_population, city_state_largest, border_both),
    "comparison": (city_population, country_area, country_population, same_region, same_currency,
                   same_country, farther_north),
}


def _checked(world: GeoWorld, questions: Iterator[Question]) -> Iterator[Question]:
    """Drop questions whose supporting sentence the expert could not reach (a guard against page changes)."""
    for q in questions:
        ok = True
        for hop in q.hops:
            page = world.corpus.pages.get(hop.title)
            for i in hop.sentences:
                if page is None or i >= len(page.sentences):
                    ok = False
                elif hop.keyword and i >= SEARCH_SENTENCES and (not page.matches(hop.keyword) or page.matches(hop.keyword)[0] != i):
                    ok = False
        if ok:
            yield q
        else:
            log.warning("dropping question %s: a supporting sentence is unreachable", q.id)


def geo_pools(world: GeoWorld) -> dict[str, dict[str, list[Question]]]:
    """pools[split][type]: questions interleaved across templates, deterministic order."""
    by_template: dict[tuple[str, str], list[Question]] = {}
    for task_type, templates in TEMPLATES.items():
        for make in templates:
            questions = sorted(_checked(world, make(world)), key=lambda q: q.id)
            if len(questions) > MAX_PER_TEMPLATE:
                questions = random.Random(make.__name__).sample(questions, MAX_PER_TEMPLATE)
            by_template[(task_type, make.__name__)] = questions
    held_out: dict[str, set[str]] = {split: set() for split in SPLITS}
    for questions in by_template.values():
        for q in questions:
            if q.bridge_entity is not None:
                held_out[split_of(q.split_key)].add(q.bridge_entity)
    # Bridge entities of test questions appear in no train or val question; those of val in no train question.
    banned = {"test": set(), "val": held_out["test"], "train": held_out["test"] | held_out["val"]}
    pools: dict[str, dict[str, list[Question]]] = {split: {} for split in SPLITS}
    for split in SPLITS:
        for task_type, templates in TEMPLATES.items():
            lists = []
            for make in templates:
                kept = [q for q in by_template[(task_type, make.__name__)] if split_of(q.split_key) == split
                        and not ({h.title for h in q.hops} | {q.bridge_entity or ""}) & banned[split]]
                random.Random(f"{split}/{make.__name__}").shuffle(kept)
                lists.append(kept)
            pools[split][task_type] = _interleave(lists)
    return pools


def _interleave(lists: list[list[Question]]) -> list[Question]:
    out: list[Question] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


# ---- real HotPotQA data -----------------------------------------------------------------------------------

CORPUS_FORMAT = "{title: [sentences]} or [[title, [sentences]], ...]"
EXPECTED_QUESTIONS = ("a JSON list of objects with `question`, `answer`, `type` (bridge or comparison) and "
                      "`supporting_facts` whose pages are in `context` or corpus_path (without them, a corpus_path "
                      "to play over)")
NO_PAGES = "no `supporting_facts` and no `context`"


def _sentences(raw: Any) -> tuple[str, ...]:
    return tuple(s.strip() for s in raw if isinstance(s, str) and s.strip()) if isinstance(raw, list) else ()


def load_corpus_pages(data: Any) -> list[Page]:
    """`{title: [sentences]}` or HotPotQA's context pairs `[[title, [sentences]], ...]`."""
    items = data.items() if isinstance(data, dict) else data
    pages = []
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            continue
        sentences = _sentences(item[1])
        if sentences:
            pages.append(Page(item[0], sentences))
    return pages


def _read_json(path: Path, setting: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{setting}: no file at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{setting} {path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None


def _found(data: Any) -> str:
    """What a JSON document is, for error messages: 'a JSON object with keys "a", "b", ...'."""
    if isinstance(data, dict):
        keys = ", ".join(json.dumps(k) for k in list(data)[:3]) + (", ..." if len(data) > 3 else "")
        return f"a JSON object with keys {keys}" if data else "an empty JSON object"
    if isinstance(data, list):
        return f"a JSON list of {len(data)}" if data else "an empty JSON list"
    return f"a JSON {type(data).__name__}"


def read_corpus(path: str | Path) -> list[Page]:
    """The pages of a corpus file; one that holds no page is an error naming it."""
    path = Path(path).expanduser()
    data = _read_json(path, "corpus_path")
    if not isinstance(data, (dict, list)) or not data:
        raise ValueError(f"corpus_path {path}: expected {CORPUS_FORMAT}, found {_found(data)}")
    pages = load_corpus_pages(data)
    if not pages:
        raise ValueError(f"corpus_path {path}: 0 of {len(data)} entries are a title with sentences; "
                         f"expected {CORPUS_FORMAT}")
    if len(pages) < len(data):
        log.warning("corpus_path %s: skipped %d of %d entries that are not a title with sentences",
                    path, len(data) - len(pages), len(data))
    return pages


def _fields(record: Any, has_corpus: bool) -> dict[str, Any] | str:
    """A record's question fields, or why it cannot be played."""
    if not isinstance(record, dict):
        return "not a JSON object"
    text = record.get("question")
    if not isinstance(text, str) or not text.strip():
        return "with no `question`"
    if record.get("answer") is None:
        return "with no `answer`"
    if record.get("type") not in TASK_TYPES:
        return "with a `type` other than bridge or comparison"
    try:
        facts = [(str(t), int(i)) for t, i in record.get("supporting_facts") or []]
    except (TypeError, ValueError):
        return "with malformed `supporting_facts` (expected [[title, sentence index], ...])"
    if not facts and not record.get("context") and not has_corpus:
        return f"with {NO_PAGES}"
    # ReAct's simplified files have no `_id`: the question text names the question as stably.
    qid = str(record["_id"]) if "_id" in record else "q" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
    return {"id": qid, "question": text, "answer": str(record["answer"]), "type": record["type"], "facts": facts}


def _real_question(fields: dict[str, Any], corpus: Corpus) -> Question | str:
    """The question, or why it cannot be played. Without supporting facts it has no hops: no expert for it."""
    qid, text = fields["id"], fields["question"]
    by_title: dict[str, list[int]] = {}
    for title, i in fields["facts"]:
        page = corpus.pages.get(title)
        if page is None:
            return "with a supporting fact on a page in neither `context` nor corpus_path"
        if 0 <= i < len(page.sentences):
            by_title.setdefault(title, []).append(i)
    if fields["facts"] and not by_title:
        return "with only supporting facts past the end of their pages"
    question_key = fold(text)
    position = {t: question_key.find(title_key(t)) for t in by_title}
    order = list(by_title)
    # The page the question names comes first: for a bridge question it leads to the other one.
    order.sort(key=lambda t: (position[t] < 0, position[t] if position[t] >= 0 else 0))
    hops = tuple(Hop(t, tuple(sorted(set(by_title[t])))) for t in order)
    return Question(id=qid, question=text, answer=fields["answer"], type=fields["type"], hops=hops, split_key=qid)


def _counts(reasons: dict[str, int]) -> str:
    return "; ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda x: -x[1]))


def load_real(questions_path: str | Path | Mapping[str, str | Path],
              corpus_path: str | Path | None = None) -> tuple[Corpus, dict[str, dict[str, list[Question]]]]:
    """Real HotPotQA questions (and their `context` paragraphs) plus an optional paragraph corpus.

    `questions_path` is one JSON file (split by a hash of `_id`) or a mapping split -> file. A question needs
    `question`, `answer` and `type`; with `supporting_facts` the expert follows them, without (ReAct's
    `hotpot_*_simplified.json`) only agents play it, over its `context` or the corpus. A file none of whose
    records can be played is an error naming it and why; skipped records are a warning with counts.
    """
    files = dict(questions_path) if isinstance(questions_path, Mapping) else {"*": questions_path}
    data: dict[str, tuple[Path, list[Any]]] = {}
    for split, path in files.items():
        if split != "*" and split not in SPLITS:
            raise ValueError(f"unknown split {split!r} in questions_path; use {', '.join(SPLITS)}")
        path = Path(path).expanduser()
        records = _read_json(path, "questions_path")
        if not isinstance(records, list) or not records:
            raise ValueError(f"questions_path {path}: expected {EXPECTED_QUESTIONS}; found {_found(records)}")
        data[split] = path, records
    pages = read_corpus(corpus_path) if corpus_path else []
    for _, records in data.values():
        for r in records:
            if isinstance(r, dict):
                pages.extend(load_corpus_pages(r.get("context") or []))
    corpus = Corpus(pages)
    pools: dict[str, dict[str, list[Question]]] = {s: {t: [] for t in TASK_TYPES} for s in SPLITS}
    for split, (path, records) in data.items():
        skipped: dict[str, int] = defaultdict(int)
        kept: list[Question] = []
        for r in records:
            f = _fields(r, bool(corpus_path))
            q = _real_question(f, corpus) if isinstance(f, dict) else f
            if isinstance(q, str):
                skipped[q] += 1
            else:
                kept.append(q)
        if not kept:
            hint = ""
            if f"with {NO_PAGES}" in skipped:
                hint = (f" Questions without supporting facts (as in ReAct's hotpot_*_simplified.json) are played "
                        f"over a local Wikipedia: pass corpus_path= a JSON file {CORPUS_FORMAT}; the expert cannot "
                        f"demonstrate them, so expert demonstrations need HotPotQA's own files "
                        f"(hotpot_train_v1.1.json, hotpot_dev_distractor_v1.json), which carry both.")
            raise ValueError(f"questions_path {path}: 0 of {len(records)} records are playable questions: "
                             f"{_counts(skipped)}. Expected {EXPECTED_QUESTIONS}.{hint}")
        if skipped:
            log.warning("questions_path %s: skipped %d of %d records: %s", path, sum(skipped.values()),
                        len(records), _counts(skipped))
        expertless = sum(not q.hops for q in kept)
        if expertless:
            log.info("questions_path %s: %d of %d questions have no `supporting_facts`: agents play them, the "
                     "expert cannot demonstrate them", path, expertless, len(kept))
        for q in kept:
            pools[split_of(q.split_key) if split == "*" else split][q.type].append(q)
    log.info("loaded %d real HotPotQA questions over %d pages",
             sum(len(x) for p in pools.values() for x in p.values()), len(corpus))
    return corpus, pools
