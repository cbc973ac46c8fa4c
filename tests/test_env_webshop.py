"""The WebShop stand-in: catalogue, pages, actions, reward and the expert, checked against WebShop's rules."""

from __future__ import annotations

import dataclasses
import re

import pytest

from sad_ray.envs import make_env
from sad_ray.envs.base import Task
from sad_ray.envs.react import demonstration
from sad_ray.envs.webshop import TASK_TYPES, WebShopEnv, build_catalogue
from sad_ray.envs.webshop.catalogue import CATEGORIES, PRODUCT_TYPES, Product, Review
from sad_ray.envs.webshop.reward import Goal, get_reward, token_set_ratio

ASIN = re.compile(r"^\[(B0[A-Z0-9]{8})\]$", re.MULTILINE)
TOTAL = re.compile(r"^Page (\d+) \(Total results: (\d+)\)$", re.MULTILINE)


@pytest.fixture(scope="module")
def env() -> WebShopEnv:
    return WebShopEnv()


def _task(kind: str, seed: int = 0, split: str = "train") -> Task:
    return Task("webshop", kind, seed, split)


@pytest.mark.parametrize("kind", TASK_TYPES)
def test_expert_wins_every_task_type(env: WebShopEnv, kind: str) -> None:
    steps = []
    for split, n in (("train", 20), ("val", 5), ("test", 5)):
        for task in env.tasks(split, n, task_types=[kind]):
            episode = demonstration(env, task)  # raises unless the expert wins
            assert episode.reward == 1.0 and episode.success
            assert episode.steps <= env.max_steps
            steps.append(episode.steps)
            thoughts = [t["content"] for t in episode.turns if t["role"] == "assistant"]
            assert all(t.startswith("Thought: ") and "\nAction: " in t for t in thoughts)
    minimum = {"no_options": 3, "one_option": 4, "two_options": 5}[kind]  # search, open, options, buy
    assert min(steps) == minimum


def test_expert_needs_no_hidden_id_and_its_thoughts_vary(env: WebShopEnv) -> None:
    thoughts, searches = set(), 0
    for task in env.tasks("train", 30):
        goal = env.goal(task)
        steps = env.expert_steps(task)
        search = steps[0].action
        assert search.startswith("search[") and goal.asin.lower() not in search.lower()
        assert goal.noun in search  # the query comes from the instruction's words
        searches += all(w in goal.instruction_text for w in search[7:-1].split())
        clicked = [s for s in steps if re.fullmatch(r"click\[B0[A-Z0-9]{8}\]", s.action)]
        # Opening an item is justified by what its title and price show.
        assert all(s.action[6:-1] in s.thought for s in clicked)
        thoughts.update(s.thought.split(".")[0] for s in steps)
    assert searches == 30
    assert len(thoughts) > 60


def test_some_experts_page_on_and_look_at_details(env: WebShopEnv) -> None:
    actions = [a for task in env.tasks("train", 150) for a in env.expert(task)]
    assert "click[Next >]" in actions
    assert "click[< Prev]" in actions
    assert {"click[Features]", "click[Description]"} & set(actions)


def test_generation_is_deterministic() -> None:
    fresh = build_catalogue.__wrapped__(1000, 0)
    cached = build_catalogue(1000, 0)
    assert [(p.asin, p.title, p.price, p.options) for p in fresh.products] == [
        (p.asin, p.title, p.price, p.options) for p in cached.products]
    assert fresh.split_of == cached.split_of
    other = build_catalogue.__wrapped__(1000, 1)
    assert [p.asin for p in other.products] != [p.asin for p in fresh.products]

    def play(e: WebShopEnv, task: Task) -> list[str]:
        pages = [e.reset(task)]
        pages += [e.step(a).observation for a in e.expert(task)]
        return pages

    first, second = WebShopEnv(), WebShopEnv()
    for kind in TASK_TYPES:
        task = _task(kind, 7, "val")
        assert first.goal(task) == second.goal(task)
        assert play(first, task) == play(second, task)
        assert first.expert_steps(task) == second.expert_steps(task)
    assert first.goal(_task("one_option", 1)).instruction_text != first.goal(_task("one_option", 2)).instruction_text


def test_catalogue_shape() -> None:
    catalogue = build_catalogue.__wrapped__(1200, 3)
    products = catalogue.products
    assert len(products) == 1200 and len({p.asin for p in products}) == 1200
    assert {p.category for p in products} == set(CATEGORIES)
    assert {len(p.options) for p in products} == {0, 1, 2}
    for p in products:
        assert p.price > 0 and p.features and p.reviews and p.description
        assert set(p.title_attributes) <= set(p.attributes)
        assert all(a in p.title.lower() for a in p.title_attributes)
        text = f"{p.title} {p.description} {' '.join(p.features)}".lower()
        # No option value hides in the product's own text (WebShop's reward would count it as chosen).
        assert not [v for vs in p.options.values() for v in vs if v in text]
    assert len(build_catalogue.__wrapped__(300, 0).products) == 300


def test_attribute_vocabulary_has_no_fuzzy_twins() -> None:
    attributes = sorted({a for kind in PRODUCT_TYPES for a in kind.attributes})
    for i, a in enumerate(attributes):
        for b in attributes[i + 1:]:
            assert a not in b and b not in a, (a, b)
            assert token_set_ratio(a, b) <= 85, (a, b)


def test_pages_follow_webshop_text_format(env: WebShopEnv) -> None:
    task = _task("two_options", 3)
    instruction = env.goal(task).instruction_text
    header = f"Instruction: [SEP] {instruction} [SEP]"
    page = env.reset(task)
    assert page.splitlines() == [header, "[Search]"]
    assert re.search(r"price lower than \d+\.00 dollars", instruction)

    result = env.step(f"search[{env.goal(task).noun}]")
    lines = result.observation.splitlines()
    assert lines[:2] == [header, "[Back to Search]"]
    page_num, total = map(int, TOTAL.search(result.observation).groups())
    assert page_num == 1 and 10 < total <= 50
    assert "[Next >]" in lines and "[< Prev]" not in lines
    codes = ASIN.findall(result.observation)
    assert len(codes) == 10
    first = lines.index(f"[{codes[0]}]")
    assert re.fullmatch(r"\$\d+\.\d\d", lines[first + 2])
    assert result.info["admissible"][:2] == ["click[Back to Search]", "click[Next >]"]

    second = env.step("click[Next >]").observation
    assert TOTAL.search(second).group(1) == "2" and "[< Prev]" in second.splitlines()
    assert env.step("click[< Prev]").observation == result.observation

    product = next(p for p in (env.catalogue.by_asin[c] for c in codes) if len(p.options) == 2)
    item = env.step(f"click[{product.asin}]")
    lines = item.observation.splitlines()
    assert lines[:3] == [header, "[Back to Search]", "[< Prev]"]
    for group, values in product.options.items():
        assert f"{group} " + " ".join(f"[{v}]" for v in values) in lines
    assert product.title in lines and f"Price: {product.price_tag}" in lines
    assert lines[-4:] == ["[Description]", "[Features]", "[Reviews]", "[Buy Now]"]
    value = next(iter(product.options.values()))[1]
    chosen = env.step(f"click[{value}]").observation
    assert chosen.startswith(f"You have clicked {value}.") and f"[[{value}]]" in chosen

    features = env.step("click[Features]").observation
    assert all(f in features for f in product.features) and "[Buy Now]" not in features
    assert env.step("click[< Prev]").observation == chosen.split("\n\n", 1)[1]  # options kept
    assert env.step("click[Back to Search]").observation.splitlines() == [header, "[Search]"]


def test_invalid_actions_give_feedback_and_keep_the_page(env: WebShopEnv) -> None:
    task = _task("one_option", 5)
    search_page = env.reset(task)
    for action in ("buy something", "click[Buy Now]", "search[]", "click[B000000000]", "", "search[x"):
        result = env.step(action)
        assert result.observation == f"Invalid action!\n\n{search_page}"
        assert not result.done and result.reward == 0.0 and not result.info["won"]
        assert result.info["admissible"] == ["search[...]"]
    results = env.step("SEARCH[ " + env.goal(task).noun + " ]")  # case and spaces are forgiven, as in WebShop
    assert "[Back to Search]" in results.observation
    again = env.step("search[something else]")
    assert again.observation == f"Invalid action!\n\n{results.observation}"
    assert env.step("click[Buy Now]").observation.startswith("Invalid action!")
    code = ASIN.findall(results.observation)[0]
    item = env.step(f"click[{code.lower()}]")
    assert item.observation.splitlines()[-1] == "[Buy Now]"
    assert f"click[{code}]" not in item.info["admissible"] and "click[Buy Now]" in item.info["admissible"]
    assert env.step(f"click[{code}]").observation.startswith("Invalid action!")


def test_step_limit_ends_the_episode_as_a_failure() -> None:
    env = WebShopEnv(max_steps=15)
    env.reset(_task("no_options", 2))
    results = [env.step("click[nothing]") for _ in range(15)]
    assert not any(r.done for r in results[:-1])
    last = results[-1]
    assert last.done and last.info["truncated"] and not last.info["won"] and last.info["step"] == 15
    with pytest.raises(RuntimeError):
        env.step("click[Buy Now]")


def test_splits_do_not_share_target_products(env: WebShopEnv) -> None:
    targets = {split: {env.goal(t).asin for t in env.tasks(split, 90)} for split in ("train", "val", "test")}
    assert not targets["train"] & targets["val"]
    assert not targets["train"] & targets["test"]
    assert not targets["val"] & targets["test"]
    for split, asins in targets.items():
        assert len(asins) > 20 and {env.catalogue.split_of[a] for a in asins} == {split}
    assert [t.id for t in env.tasks("val", 4, start=2)] == [t.id for t in env.tasks("val", 6)][2:]
    with pytest.raises(ValueError):
        env.tasks("val", 3, task_types=["nope"])


def test_buying_the_wrong_option_through_the_env(env: WebShopEnv) -> None:
    task = _task("two_options", 11)
    goal = env.goal(task)
    actions = env.expert(task)
    env.reset(task)
    for action in actions[:-3]:
        env.step(action)
    first_group, wanted = next(iter(goal.goal_options.items()))
    bought = [a for a in actions if re.fullmatch(r"click\[B0[A-Z0-9]{8}\]", a)][-1]
    product = env.catalogue.by_asin[bought[6:-1]]  # the item the expert is about to configure
    wrong = next(v for v in product.options[first_group] if v != wanted)
    for action in actions[-3:-1]:
        env.step(f"click[{wrong}]" if action == f"click[{wanted}]" else action)
    result = env.step("click[Buy Now]")
    n_att = len(goal.attributes)
    assert result.done and not result.info["won"]
    assert result.reward == pytest.approx((n_att + 1 + 1) / (n_att + 2 + 1))
    assert result.observation.endswith(f"Your score (min 0.0, max 1.0): {result.reward:.2f}")


def _product(**fields: object) -> Product:
    base = dict(asin="B0TEST0001", category="beauty", query="lipstick",
                product_category="Beauty & Personal Care › Makeup › Lips › Lipstick",
                title="Lumora Long Lasting Waterproof Lipstick, Value Pack", brand="Lumora", price=14.99,
                attributes=("long lasting", "waterproof", "cruelty free"),
                title_attributes=("long lasting", "waterproof"),
                options={"color": ("nude", "berry", "coral"), "size": ("0.12 ounce", "0.12 ounce (pack of 2)")},
                description="A lipstick that stays.", features=("LONG LASTING: all day",),
                reviews=(Review("Nice", 5, "Good."),), rating="4.5")
    base.update(fields)
    return Product(**base)  # type: ignore[arg-type]


GOAL = Goal(asin="B0TEST0001", category="beauty", query="lipstick",
            product_category="Beauty & Personal Care › Makeup › Lips › Lipstick",
            name="Lumora Long Lasting Waterproof Lipstick, Value Pack", noun="lipstick",
            attributes=("long lasting", "waterproof"), goal_options={"color": "berry", "size": "0.12 ounce"},
            price_upper=30.0)
RIGHT = {"color": "berry", "size": "0.12 ounce"}


@pytest.mark.parametrize(("product", "goal", "options", "expected"), [
    # r = r_type * (n_att + n_opt + r_price) / (n_att_goal + n_opt_goal + 1), here with 2 attributes, 2 options
    (_product(), GOAL, RIGHT, 1.0),
    (_product(), GOAL, {"color": "coral", "size": "0.12 ounce"}, 4 / 5),  # one wrong option
    (_product(), GOAL, {"color": "berry", "size": "0.12 ounce (pack of 2)"}, 4 / 5),  # size is matched exactly
    (_product(), GOAL, {}, 3 / 5),  # no option chosen: WebShop counts chosen options
    (_product(price=34.99), GOAL, RIGHT, 4 / 5),  # over the price bound
    (_product(title="Velisse Matte Lipstick", brand="Velisse", attributes=("matte finish", "vegan"), features=()),
     GOAL, RIGHT, 3 / 5),  # a lipstick with neither attribute; nouns 1/2 shared, so the type still matches
    (_product(title="Lumora Long Lasting Lipstick", attributes=("long lasting", "cruelty free")),
     GOAL, RIGHT, 4 / 5),  # one attribute missing
    (_product(title="Lumora Long-Lasting Lipstick", attributes=("lasting long",)), GOAL, RIGHT, 4 / 5),  # fuzzy
    (_product(query="hdmi cable", category="electronics", brand="Arkon", title="Arkon Waterproof HDMI Cable",
              product_category="Electronics › Computers & Accessories › Cables & Accessories › HDMI Cables"),
     GOAL, RIGHT, 0.0),  # another product type and brand: no shared noun, r_type 0
    (_product(query="nail polish", title="Lumora Long Lasting Waterproof Nail Polish",
              product_category="Beauty & Personal Care › Foot, Hand & Nail Care › Nail Polish"),
     GOAL, RIGHT, 1.0),  # same brand, same top category: WebShop's type check lets it through
    (_product(), dataclasses.replace(GOAL, goal_options={}), {}, 1.0),  # a goal without options
])
def test_reward_matches_webshop_formula(product: Product, goal: Goal, options: dict[str, str],
                                        expected: float) -> None:
    reward, info = get_reward(product, goal, options)
    assert reward == pytest.approx(expected)
    assert 0.0 <= reward <= 1.0 and {"r_type", "r_att", "r_price", "title_score"} <= set(info)


def test_type_reward_levels() -> None:
    # title_score = shared nouns / goal nouns; < 0.1 gives 0.1, no match on query/category/title gives 0.5
    many = dataclasses.replace(GOAL, name="Lumora Velisse Aurelle Nuvana Sorelle Kaiya Bellami Odessi Lipstick "
                                          "Shampoo Hoodie")
    other_path = "Clothing, Shoes & Jewelry › Men › Clothing › Fashion Hoodies & Sweatshirts"
    hoodie = _product(query="hoodie", title="Corvo Hoodie", product_category=other_path)
    reward, info = get_reward(hoodie, many, RIGHT)
    assert info["title_score"] == pytest.approx(1 / 11) and info["r_type"] == 0.1
    few = dataclasses.replace(many, name="Lumora Velisse Aurelle Nuvana Sorelle Hoodie")
    reward, info = get_reward(hoodie, few, RIGHT)
    assert info["title_score"] == pytest.approx(1 / 6) and info["r_type"] == 0.5
    assert not info["query_match"] and not info["category_match"]


def test_token_set_ratio_behaves_like_thefuzz() -> None:
    assert token_set_ratio("long lasting", "Lasting, long") == 100
    assert token_set_ratio("water resistant", "water resistant design") == 100  # subset
    assert token_set_ratio("long lasting", "fast charging") < 50
    assert token_set_ratio("", "x") == 0


def test_bm25_ranks_an_exact_title_first(env: WebShopEnv) -> None:
    catalogue = env.catalogue
    for product in catalogue.products[::37]:
        hits = catalogue.search(product.title)
        assert hits[0].asin == product.asin, product.title
        assert len(hits) <= 50
    assert catalogue.search("zzzz qqqq") == []
    assert catalogue.search("waterproof lipstick") == catalogue.search("lipstick waterproof")


def test_make_env_plays_the_test_split() -> None:
    env = make_env("webshop", num_products=500)
    assert isinstance(env, WebShopEnv) and len(env.catalogue.products) == 500
    tasks = env.tasks("test", 30)
    for task in tasks:
        env.reset(task)
        for action in env.expert(task):
            result = env.step(action)
        assert result.info["won"] and result.done


def test_a_task_means_the_same_goal_whatever_the_step_limit() -> None:
    loose, tight = WebShopEnv(max_steps=15), WebShopEnv(max_steps=2)
    for task in loose.tasks("train", 6):
        assert loose.goal(task) == tight.goal(task)
        tight.reset(task)
        result = None
        for action in tight.expert(task):
            result = tight.step(action)
            if result.done:
                break
        assert result is not None and result.done
