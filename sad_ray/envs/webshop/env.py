"""The WebShop stand-in: WebShop's text pages and search/click actions over the generated catalogue, goals
written from target products, and a scripted shopper that wins every task.

Task types (by the option groups the target product has, i.e. how many choices the buyer must make):
  no_options   the target has no options: search, pick the right item, buy.
  one_option   one option group (a colour, a size, a scent...) must be chosen before buying.
  two_options  two option groups (e.g. colour and size) must be chosen.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from sad_ray.envs.base import SPLITS, Environment, ExpertStep, StepResult, Task
from sad_ray.envs.webshop.catalogue import PRODUCT_WINDOW, Catalogue, Product, build_catalogue
from sad_ray.envs.webshop.reward import Goal, get_reward, price_upper_bound

log = logging.getLogger(__name__)

TASK_TYPES = ("no_options", "one_option", "two_options")
N_OPTION_GROUPS = {"no_options": 0, "one_option": 1, "two_options": 2}

BACK_TO_SEARCH, PREV_PAGE, NEXT_PAGE, BUY_NOW = "Back to Search", "< Prev", "Next >", "Buy Now"
SUB_PAGES = ("Description", "Features", "Reviews")
SEARCH_PLACEHOLDER = "search[...]"

# Nouns written without an article in instructions ("i need organic green tea"), and plural ones.
MASS_NOUNS = frozenset(("granola", "green tea", "olive oil", "coffee beans", "wireless earbuds", "running shoes",
                        "yoga leggings", "shampoo"))
PLURAL_NOUNS = frozenset(("coffee beans", "wireless earbuds", "running shoes", "yoga leggings"))
OPENERS = ("i need", "i am looking for", "i want", "i'm looking for", "find me", "i would like", "get me")

_ACTION = re.compile(r"\s*(search|click)\s*\[(.*)\]\s*", re.IGNORECASE | re.DOTALL)


# Goals are drawn so the expert's route fits this many steps. It is fixed, not the env's step limit, so that a
# task means the same goal whatever limit an experiment sets (a tight limit truncates, never redraws).
ROUTE_BUDGET = 15


@dataclass
class _Session:
    goal: Goal
    page: str = "search"  # search | results | item | sub | done
    keywords: str = ""
    results: list[Product] = field(default_factory=list)
    page_num: int = 1
    asin: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    sub: str | None = None


@dataclass(frozen=True)
class _Route:
    """How the goal is reached from a search: the items opened and given up on, then the one bought."""

    query: str
    results: tuple[Product, ...]
    rejected: tuple[Product, ...]
    bought: Product


def _join(items: Sequence[str], last: str = "and") -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def _article(noun_phrase: str, noun: str) -> str:
    if noun in MASS_NOUNS:
        return noun_phrase
    an = noun_phrase[0] in "aeiou" or noun_phrase.startswith(("hdmi", "x-", "rfid", "8 ", "18 "))
    return f"{'an' if an else 'a'} {noun_phrase}"


def instruction_text(target: Product, attributes: Sequence[str], options: dict[str, str], price_upper: float,
                     rng: random.Random) -> str:
    """WebShop-style instruction: '<opener> <product with attributes and options>, and price lower than X'."""
    noun = target.query
    be = "are" if noun in PLURAL_NOUNS else "is"
    values = list(options.values())
    inline = values and all(len(v.split()) <= 2 and not re.search(r"[\d()]", v) for v in values)
    form = rng.randrange(3 if inline else 2)
    if form == 2:  # "a long lasting x-large navy t-shirt"
        thing = _article(f"{' '.join(attributes)} {' '.join(values)} {noun}", noun)
    elif rng.random() < 0.5:
        thing = _article(f"{_join(attributes)} {noun}", noun)
    else:
        thing = f"{_article(noun, noun)} that {be} {_join(attributes)}"
    text = f"{rng.choice(OPENERS)} {thing}"
    if options and form == 0:
        text += " in " + " and ".join(f"{v} {g}" for g, v in options.items())
    elif options and form == 1:
        text += " with " + ", and ".join(f"{g}: {v}" for g, v in options.items())
    if price_upper < 1_000_000:
        text += f", and price lower than {price_upper:.2f} dollars"
    return text


def visible_fit(product: Product, goal: Goal) -> bool:
    """What a shopper can tell from a results page: right product type, every attribute, within budget."""
    title = product.title.lower()
    return goal.noun in title and all(a in title for a in goal.attributes) and product.price <= goal.price_upper


def _why_not(product: Product, goal: Goal) -> str:
    title = product.title.lower()
    if goal.noun not in title:
        sells, wanted = _article(product.query, product.query), _article(goal.noun, goal.noun)
        return f"[{product.asin}] sells {sells}, not {wanted}"
    missing = [a for a in goal.attributes if a not in title]
    if missing:
        return f"[{product.asin}] does not say {missing[0]}"
    return f"[{product.asin}] costs {product.price_tag}, over {goal.price_upper:.2f} dollars"


class WebShopEnv(Environment):
    """WebShop's text interface over a generated catalogue; reward on Buy Now as in WebShop's get_reward."""

    name = "webshop"
    task_types = TASK_TYPES

    def __init__(self, num_products: int = 1000, catalogue_seed: int = 0, max_steps: int = 15) -> None:
        super().__init__()
        self.max_steps = max_steps
        self.catalogue_seed = catalogue_seed
        self.catalogue: Catalogue = build_catalogue(num_products, catalogue_seed)
        self._targets: dict[tuple[str, str], list[Product]] = {
            (split, kind): [p for p in self.catalogue.products
                            if self.catalogue.split_of[p.asin] == split and len(p.options) == n]
            for split in SPLITS for kind, n in N_OPTION_GROUPS.items()
        }
        self._goals: dict[str, tuple[Goal, _Route]] = {}
        self._session: _Session | None = None

    # ----- tasks and goals -----

    def tasks(self, split: str, n: int, task_types: Sequence[str] | None = None, start: int = 0) -> list[Task]:
        kinds = tuple(task_types or self.task_types)
        unknown = [k for k in kinds if k not in self.task_types]
        if unknown or split not in SPLITS:
            raise ValueError(f"unknown split {split!r} or task types {unknown}; known: {', '.join(self.task_types)}")
        return [Task(self.name, kinds[i % len(kinds)], i, split) for i in range(start, start + n)]

    def goal(self, task: Task) -> Goal:
        """The goal a task's seed stands for: a target product of the split, 1-3 of its attributes, a value
        for each of its option groups and a price bound; redrawn until the shopper can reach it in time."""
        return self._goal_and_route(task)[0]

    def _goal_and_route(self, task: Task) -> tuple[Goal, _Route]:
        if task.id in self._goals:
            return self._goals[task.id]
        pool = self._targets[(task.split, task.task_type)]
        if not pool:
            raise ValueError(f"no {task.task_type} target products in split {task.split}; enlarge the catalogue")
        rng = random.Random(f"webshop-goal/{self.catalogue_seed}/{task.id}")
        for _ in range(100):
            target = rng.choice(pool)
            shown = target.title_attributes
            attributes = tuple(rng.sample(shown, rng.randint(1, min(3, len(shown)))))
            options = {g: rng.choice(values) for g, values in target.options.items()}
            price_upper = price_upper_bound(target.price, rng)
            goal = Goal(asin=target.asin, category=target.category, query=target.query,
                        product_category=target.product_category, name=target.title, noun=target.query,
                        attributes=attributes, goal_options=options, price_upper=price_upper,
                        instruction_text=instruction_text(target, attributes, options, price_upper, rng))
            for query in self._queries(goal, rng):
                route = self._route(goal, query)
                # Room for the longest demonstration: a look at a sub page (2 steps) on top of the route.
                if route is not None and self._route_steps(goal, route) + 2 <= ROUTE_BUDGET:
                    if len(self._goals) > 4096:
                        self._goals.clear()
                    self._goals[task.id] = (goal, route)
                    return goal, route
        raise RuntimeError(f"could not draw a reachable goal for {task.id}")

    @staticmethod
    def _queries(goal: Goal, rng: random.Random) -> list[str]:
        """The shopper's search, from the instruction's words: mostly everything asked for, sometimes just the
        product type (with one feature), which leaves more results to page through. Full query as fallback."""
        full = [*goal.attributes, goal.noun] if rng.random() < 0.5 else [goal.noun, *goal.attributes]
        draw = rng.random()
        broad = [goal.noun] if draw < 0.15 else [goal.attributes[0], goal.noun] if draw < 0.4 else full
        return [" ".join(broad), " ".join(full)]

    def _route(self, goal: Goal, query: str) -> _Route | None:
        results = tuple(self.catalogue.search(query))
        rejected: list[Product] = []
        for product in results:
            if not visible_fit(product, goal):
                continue
            if all(v in product.options.get(g, ()) for g, v in goal.goal_options.items()):
                reward, _ = get_reward(product, goal, dict(goal.goal_options))
                # A product that looks right and has the options but scores below 1 would make the
                # shopper's reasoning wrong: give up on this goal instead.
                return _Route(query, results, tuple(rejected), product) if reward == 1.0 else None
            rejected.append(product)
        return None

    @staticmethod
    def _route_steps(goal: Goal, route: _Route) -> int:
        last_page = route.results.index(route.bought) // PRODUCT_WINDOW + 1
        return 1 + (last_page - 1) + 2 * len(route.rejected) + 1 + len(goal.goal_options) + 1

    # ----- pages -----

    def _header(self) -> str:
        assert self._session is not None
        return f"Instruction: [SEP] {self._session.goal.instruction_text} [SEP]"

    def _page_total(self) -> int:
        assert self._session is not None
        return len(self._session.results)

    def _render(self) -> str:
        s = self._session
        assert s is not None
        lines = [self._header()]
        if s.page == "search":
            lines.append("[Search]")
        elif s.page == "results":
            lines += [f"[{BACK_TO_SEARCH}]", f"Page {s.page_num} (Total results: {self._page_total()})"]
            if s.page_num > 1:
                lines.append(f"[{PREV_PAGE}]")
            if s.page_num * PRODUCT_WINDOW < self._page_total():
                lines.append(f"[{NEXT_PAGE}]")
            for p in self._page_products():
                lines += [f"[{p.asin}]", p.title, p.price_tag]
        elif s.page == "item":
            p = self.catalogue.by_asin[s.asin or ""]
            lines += [f"[{BACK_TO_SEARCH}]", f"[{PREV_PAGE}]"]
            for group, values in p.options.items():
                marked = (f"[[{v}]]" if s.options.get(group) == v else f"[{v}]" for v in values)
                lines.append(f"{group} {' '.join(marked)}")
            lines += [p.title, f"Price: {p.price_tag}", f"Rating: {p.rating}"]
            lines += [f"[{b}]" for b in (*SUB_PAGES, BUY_NOW)]
        elif s.page == "sub":
            p = self.catalogue.by_asin[s.asin or ""]
            lines += [f"[{BACK_TO_SEARCH}]", f"[{PREV_PAGE}]"]
            if s.sub == "Description":
                lines.append(p.description)
            elif s.sub == "Features":
                lines += list(p.features)
            else:
                lines += [f"{r.title} [SEP] {r.score} out of 5 [SEP] {r.body}" for r in p.reviews]
        return "\n".join(lines)

    def _page_products(self) -> list[Product]:
        s = self._session
        assert s is not None
        return s.results[(s.page_num - 1) * PRODUCT_WINDOW: s.page_num * PRODUCT_WINDOW]

    def _buttons(self) -> list[str]:
        """The clickable texts of the current page, as shown."""
        s = self._session
        assert s is not None
        if s.page == "results":
            buttons = [BACK_TO_SEARCH]
            if s.page_num > 1:
                buttons.append(PREV_PAGE)
            if s.page_num * PRODUCT_WINDOW < self._page_total():
                buttons.append(NEXT_PAGE)
            return buttons + [p.asin for p in self._page_products()]
        if s.page == "item":
            p = self.catalogue.by_asin[s.asin or ""]
            values = [v for vs in p.options.values() for v in vs]
            return [BACK_TO_SEARCH, PREV_PAGE, *values, *SUB_PAGES, BUY_NOW]
        if s.page == "sub":
            return [BACK_TO_SEARCH, PREV_PAGE]
        return []

    def admissible_actions(self) -> list[str]:
        if self._session is None or self._session.page == "done":
            return []
        search = [SEARCH_PLACEHOLDER] if self._session.page == "search" else []
        return search + [f"click[{b}]" for b in self._buttons()]

    # ----- episode -----

    def _reset(self, task: Task) -> str:
        goal, _ = self._goal_and_route(task)
        self._session = _Session(goal=goal)
        return self._render()

    def _result(self, observation: str, reward: float = 0.0, done: bool = False, **info: object) -> StepResult:
        return StepResult(observation, reward, done, {"won": False, **info, "admissible": self.admissible_actions()})

    def _invalid(self) -> StepResult:
        return self._result(f"Invalid action!\n\n{self._render()}", invalid=True)

    def _step(self, action: str) -> StepResult:
        s = self._session
        assert s is not None
        match = _ACTION.fullmatch(action)
        if match is None:
            return self._invalid()
        kind, arg = match.group(1).lower(), match.group(2).strip()
        if kind == "search":
            if s.page != "search" or not arg:
                return self._invalid()
            s.keywords, s.results = arg.lower(), self.catalogue.search(arg)
            s.page, s.page_num, s.asin, s.options = "results", 1, None, {}
            return self._result(self._render())
        button = next((b for b in self._buttons() if b.lower() == arg.lower()), None)
        if button is None:
            return self._invalid()
        if button == BACK_TO_SEARCH:
            s.page, s.asin, s.options, s.sub = "search", None, {}, None
        elif s.page == "results" and button in (PREV_PAGE, NEXT_PAGE):
            s.page_num += 1 if button == NEXT_PAGE else -1
        elif s.page == "results":
            s.page, s.asin, s.options = "item", button, {}
        elif s.page == "item" and button == PREV_PAGE:
            s.page, s.asin, s.options = "results", None, {}
        elif s.page == "item" and button == BUY_NOW:
            return self._buy()
        elif s.page == "item" and button in SUB_PAGES:
            s.page, s.sub = "sub", button
        elif s.page == "item":
            product = self.catalogue.by_asin[s.asin or ""]
            group = next(g for g, values in product.options.items() if button in values)
            s.options[group] = button
            return self._result(f"You have clicked {button}.\n\n{self._render()}")
        elif s.page == "sub":  # < Prev back to the item, its options kept
            s.page, s.sub = "item", None
        return self._result(self._render())

    def _buy(self) -> StepResult:
        s = self._session
        assert s is not None
        product = self.catalogue.by_asin[s.asin or ""]
        reward, parts = get_reward(product, s.goal, dict(s.options))
        s.page = "done"
        observation = f"Thank you for shopping with us!\nYour score (min 0.0, max 1.0): {reward:.2f}"
        return self._result(observation, reward, True, won=reward == 1.0, reward_info=parts, bought=product.asin,
                            options=dict(s.options))

    # ----- the expert -----

    def expert_steps(self, task: Task) -> list[ExpertStep]:
        goal, route = self._goal_and_route(task)
        rng = random.Random(f"webshop-expert/{self.catalogue_seed}/{task.id}")
        return _Shopper(goal, route, rng, look_budget=ROUTE_BUDGET - self._route_steps(goal, route)).steps()


class _Shopper:
    """Writes the demonstration of a route: each thought says what is sought and what the page shows."""

    def __init__(self, goal: Goal, route: _Route, rng: random.Random, look_budget: int) -> None:
        self.goal, self.route, self.rng = goal, route, rng
        self.look = look_budget >= 2 and rng.random() < 0.3
        self.out: list[ExpertStep] = []
        self.wanted = f"{_join(goal.attributes)} {goal.noun}"
        self.budget = f"under {goal.price_upper:.2f} dollars"

    def say(self, templates: Sequence[str], action: str, **fields: str) -> None:
        self.out.append(ExpertStep(self.rng.choice(templates).format(**fields), action))

    def steps(self) -> list[ExpertStep]:
        goal, route = self.goal, self.route
        options = _join([f"{v} {g}" for g, v in goal.goal_options.items()]) if goal.goal_options else ""
        need = f"{self.wanted} in {options}" if options else self.wanted
        query = route.query
        if len(query.split()) < len(f"{' '.join(goal.attributes)} {goal.noun}".split()):
            templates: tuple[str, ...] = (
                "I need {need}, {budget}. I will start broad with '{query}' and check the titles.",
                "The instruction asks for {need}, {budget}. A short search for '{query}' first; "
                "then I look for the rest in the results.",
            )
        else:
            templates = (
                "I need {need}, {budget}. I will search for the product type and its features.",
                "The instruction asks for {need}, {budget}. Let me search with the key words.",
                "I am shopping for {need} that costs {budget}. First I search for '{query}'.",
                "Looking for {need}, {budget}. A search for '{query}' should bring it up.",
            )
        self.say(templates, f"search[{query}]", need=need, budget=self.budget, query=query)

        page, checked = 1, 0  # results page shown, and how many results have been looked at
        for n, product in enumerate((*route.rejected, route.bought)):
            index = route.results.index(product)
            while index // PRODUCT_WINDOW + 1 > page:
                # A result given up on (missing option) may sit on this page: then only "no other" is true.
                other = " other" if checked > (page - 1) * PRODUCT_WINDOW else ""
                self.say((
                    "No{other} result on page {page} is {a_wanted} {budget}. I will check the next page.",
                    "Nothing{other} on page {page} fits: I need {a_wanted} {budget}. Next page.",
                    "Page {page} has no{other} {wanted} within budget. Let me look at the next page.",
                ), f"click[{NEXT_PAGE}]", other=other, page=str(page), wanted=self.wanted,
                    a_wanted=_article(self.wanted, goal.noun), budget=self.budget)
                page, checked = page + 1, page * PRODUCT_WINDOW
            # Every result between two candidates fails the visible check (candidates are the visible fits).
            self._open(product, list(route.results[checked:index]), again=n > 0)
            checked = index + 1
            if product is not route.bought:
                group, value = next((g, v) for g, v in goal.goal_options.items()
                                    if v not in product.options.get(g, ()))
                if group in product.options:
                    back: tuple[str, ...] = (
                        "This item does not come in {value} {group}, which the instruction asks for. "
                        "Back to the results.",
                        "The {group} choices here do not include {value}. I need another item, so I go back.",
                        "No {value} {group} for this one. I will return to the results and try the next match.",
                    )
                else:
                    back = (
                        "This item has no {group} choice, but I need {value} {group}. Back to the results.",
                        "There is no {group} to choose here, and the instruction wants {value}. I go back.",
                    )
                self.say(back, f"click[{PREV_PAGE}]", group=group, value=value)
        self._choose_and_buy(route.bought)
        return self.out

    def _open(self, product: Product, skipped: list[Product], again: bool) -> None:
        noun = self.goal.noun
        fields = {"asin": product.asin, "noun": noun, "a_noun": _article(noun, noun),
                  "be": "are" if noun in PLURAL_NOUNS else "is", "attrs": _join(self.goal.attributes),
                  "price": product.price_tag, "limit": f"{self.goal.price_upper:.2f}"}
        reason = ""
        if skipped:
            reason = self.rng.choice(("{why}, so it does not fit. ", "Skipping some results: {why}. ",
                                      "{why}. ")).format(why=_why_not(skipped[0], self.goal))
            reason = reason[0].upper() + reason[1:]
        lead = "Another candidate: " if again else ""
        self.say((
            reason + lead + "[{asin}] offers {a_noun} that {be} {attrs}, at {price}, below {limit} dollars. "
            "I will open it.",
            reason + lead + "[{asin}] matches: {attrs} {noun} for {price}, within the {limit} dollar budget.",
            reason + lead + "The title of [{asin}] says {attrs} and it costs {price} (limit {limit}). "
            "Let me open it.",
        ), f"click[{product.asin}]", **fields)

    def _choose_and_buy(self, product: Product) -> None:
        goal = self.goal
        pending = list(goal.goal_options.items())
        if self.look:
            sub = self.rng.choice(("Features", "Description"))
            self.say((
                "Before buying, I will read the {sub_lower} to make sure it is {attrs}.",
                "Let me check the {sub_lower} of the {noun} to confirm it is {attrs}.",
            ), f"click[{sub}]", sub_lower=sub.lower(), attrs=_join(goal.attributes), noun=goal.noun)
            then = "choose the options" if pending else "buy it"
            self.say((
                "The {sub_lower} {confirm} it is {attrs}. Back to the item to {then}.",
                "Good, the {sub_lower} mentions {attrs}. I go back to {then}.",
            ), f"click[{PREV_PAGE}]", sub_lower=sub.lower(), attrs=_join(goal.attributes), then=then,
                confirm="confirm" if sub == "Features" else "confirms")
        for group, value in pending:
            offered = ", ".join(product.options[group])
            self.say((
                "The instruction asks for {value} {group}. The {group} choices are {offered}; I select {value}.",
                "I need {group} {value}, and this item offers it. Selecting {value}.",
                "{group_cap} must be {value}. I will click it.",
            ), f"click[{value}]", value=value, group=group, offered=offered, group_cap=group[:1].upper() + group[1:])
        chosen = _join([f"{v} {g}" for g, v in goal.goal_options.items()]) if pending else ""
        options_note = f" with {chosen} selected" if chosen else ""
        self.say((
            "The item is {attrs}{options_note}, and {price} is below {limit} dollars. I will buy it.",
            "Everything matches: {attrs} {noun}{options_note}, {price} within budget. Buy now.",
            "All requirements are met{options_note}. Buying it.",
        ), f"click[{BUY_NOW}]", noun=goal.noun, attrs=_join(goal.attributes), options_note=options_note,
            price=product.price_tag, limit=f"{goal.price_upper:.2f}")
