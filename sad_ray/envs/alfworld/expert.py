"""The exploring expert: searches receptacles in a sensible order, then takes, heats/cools/cleans or lights, places.

It plays the room from the scene it is given, but only *uses* what it has seen: it goes to likely receptacles
first (by `layouts.prior`), opens closed ones, remembers what it passed, and says so in a short thought whose
phrasing a seeded RNG picks from several templates. Its actions are the same for any RNG.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sad_ray.envs.alfworld.layouts import APPLIANCE, LAMP, LAMP_HOLDERS, holds, prior
from sad_ray.envs.alfworld.scene import Scene, SceneReceptacle
from sad_ray.envs.base import ExpertStep


@dataclass(frozen=True)
class Goal:
    """ALFRED's task parameters (`traj_data.json` `pddl_params`), with classes as ALFRED spells them."""

    task_type: str
    object_target: str
    parent_target: str = ""
    toggle_target: str = ""

    @property
    def verb(self) -> str:
        return {"pick_clean_then_place_in_recep": "clean", "pick_heat_then_place_in_recep": "heat",
                "pick_cool_then_place_in_recep": "cool"}.get(self.task_type, "")


THOUGHTS: dict[str, tuple[str, ...]] = {
    # {likely}: every place that can hold the object, in search order ("cabinet 1 2 3, fridge 1"); {left}: the
    # same list without the places searched. A small model keeps track of its search by copying the last list
    # without its head: no ranges to count down ("cabinet (1-3)" taught one to walk on to "desk 2" of a room with
    # one desk), and no place that appears in the list later (a list cut at three classes grew a new tail).
    "plan": (
        "{task} First I need to find {a_obj}. Places to search: {likely}. I will start with {recep}.",
        "{task} To do that I have to locate {a_obj}. Places to search: {likely}. {Recep} comes first.",
        "{task} I don't see {a_obj} yet. Places to search: {likely}. I'll check {recep} first.",
    ),
    "miss": (
        "There is no {obj} in {prev}. Left to search: {left}. Next I will check {recep}.",
        "{Prev} has no {obj}. Left to search: {left}. Let me try {recep}.",
        "No {obj} at {prev}. Left to search: {left}. {Recep} is next.",
    ),
    "open": (
        "{Recep} is closed. I will open it and look inside.",
        "I need to open {recep} to see what is in it.",
        "{Recep} is closed; opening it to check for {a_obj}.",
    ),
    "take": (
        "I found {item} in {recep}. I'll take it.",
        "There is {item} here in {recep}. Next I take it.",
        "{Recep} has {item}, which is what I need. Taking it.",
        "Now I see {item} in {recep}. I pick it up.",
    ),
    "recall": (
        "I saw {item} in {recep} earlier, so I go back there.",
        "I remember {item} in {recep}. Going there to get it.",
        "Earlier I passed {item} in {recep}; I return for it.",
    ),
    "to_appliance": (
        "Now I have {item}. Next I need to {verb} it with {app}, so I go to {app}.",
        "{Item} is in my hands. To {verb} it, I go to {app}.",
        "I took {item}. The task needs it {state} first, so I head to {app}.",
    ),
    "appliance": (
        "I am at {app}. I {verb} {item} here.",
        "{App} is here, so I can {verb} {item} now.",
        "Now I {verb} {item} with {app}.",
    ),
    "to_target": (
        "Now I have {held}. Next I put it in/on {target}.",
        "{Held} is ready. I go to {target} to put it there.",
        "I carry {held}; the task wants it in/on {target}, so I go there.",
    ),
    "open_target": (
        "{Target} is closed. I open it so I can put {item} inside.",
        "I have to open {target} before I can put {item} in it.",
    ),
    "place": (
        "I am at {target}. I put {item} in/on it.",
        "Now I put {item} in/on {target}, as the task asks.",
        "{Target} is here; I place {item} in/on it.",
    ),
    "second": (
        "One {obj} is in/on {target}. I still need a second {obj}. {where}",
        "That is the first {obj}. Now I need another one. {where}",
        "I placed one {obj}. I need a second {obj}. {where}",
    ),
    "lamp_plan": (
        "Now I have {item}. Next I need a {lamp} to look at it under. Places to search: {likely}. I will check "
        "{recep} first.",
        "{Item} is in hand. I still have to find a {lamp}. Places to search: {likely}. I'll start with {recep}.",
    ),
    "lamp_recall": (
        "Now I have {item}. I saw {lamp_item} in {recep} earlier, so I go there.",
        "{Item} is in hand, and I remember {lamp_item} in {recep}. Going there to use it.",
    ),
    "use_lamp": (
        "{Lamp_item} is here. I turn it on to look at {item} under its light.",
        "I hold {item} next to {lamp_item}; now I use {lamp_item}.",
        "Now I can use {lamp_item} to examine {item} in the light.",
    ),
}

_TASK_RESTATE = ("The task is to {desc}.", "My task: {desc}.", "I have to {desc}.")
_STATE_WORD = {"clean": "clean", "heat": "hot", "cool": "cool"}
_PLAIN_PICK = ("pick_and_place_simple", "pick_two_obj_and_place")


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Explorer:
    """Walks the room like a player: where it stands, what it opened, what it has seen, what it carries."""

    def __init__(self, scene: Scene, goal: Goal, rng: random.Random) -> None:
        self.scene, self.goal, self.rng = scene, goal, rng
        self.loc = scene.agent_loc
        self.contents = {r: list(objs) for r, objs in scene.contents.items()}
        self.opened: set[str] = set()
        self.known: dict[str, list[str]] = {}  # receptacle -> what the agent saw in it, in visiting order
        self.steps: list[ExpertStep] = []
        self.obj = goal.object_target.lower()

    def say(self, kind: str, action: str, **fields: str) -> None:
        """Record an action with a thought of this kind; "{Recep}" in a template is "{recep}" capitalised."""
        fields |= {_cap(k): _cap(v) for k, v in fields.items()}
        template = self.rng.choice(THOUGHTS[kind])
        self.steps.append(ExpertStep(" ".join(template.format(**fields).split()), action))

    def rec(self, name: str) -> SceneReceptacle:
        return self.scene.receptacles[name]

    def visible(self, r: str) -> bool:
        return not self.rec(r).openable or r in self.opened

    def look(self, r: str) -> None:
        self.known[r] = list(self.contents[r])

    # -- moving and looking ---------------------------------------------------------------------------------
    def approach(self, r: str, kind: str, **fields: str) -> None:
        """Go to `r` unless the agent stands there already ("go to" its own location does nothing)."""
        if self.loc != self.rec(r).loc:
            self.say(kind, f"go to {r}", **fields)
            self.loc = self.rec(r).loc
            if self.visible(r):
                self.look(r)

    def inspect(self, r: str, kind: str, **fields: str) -> None:
        """See inside `r`: go there, then open it if closed, or examine it if the agent was already there."""
        if self.loc != self.rec(r).loc:
            self.approach(r, kind, recep=r, **fields)
            kind = "open"
            if self.visible(r):
                return
        if self.visible(r):
            self.say(kind, f"examine {r}", recep=r, **fields)
        else:
            self.say(kind, f"open {r}", recep=r, **fields)
            self.opened.add(r)
        self.look(r)

    def in_sight(self, cls: str, ok: Callable[[str, str], bool]) -> tuple[str, str] | None:
        for r, objs in self.known.items():
            for o in objs:
                if self.scene.object_cls.get(o, "").lower() == cls.lower() and ok(o, r):
                    return o, r
        return None

    def find(self, cls: str, ok: Callable[[str, str], bool], order: list[str], kind: str,
             scope: Collection[str] = (), **fields: str) -> tuple[str, str]:
        """Search `order` until an acceptable object of `cls` is seen; returns (object, receptacle). The thoughts
        list what is left of `scope` (the plausible places), or of `order` once those are all searched."""
        hit = self.in_sight(cls, ok)
        prev = ""
        for r in order:
            if hit:
                return hit
            if r in self.known:
                continue
            if prev:
                rest = [x for x in order if x not in self.known]
                left = self.places([x for x in rest if x in scope] or rest)
                self.inspect(r, "miss", prev=prev, left=left, **fields)
            else:
                self.inspect(r, kind, **fields)
            prev, hit = r, self.in_sight(cls, ok)
        if hit:
            return hit
        raise RuntimeError(f"the ALFWorld expert searched every receptacle and found no {cls}")

    def search_order(self, cls: str, last: set[str]) -> tuple[list[str], list[str]]:
        """(receptacles to search for a class, the plausible ones among them): classes that can hold it first,
        likeliest first and `last` after them, then any other (real games may break ALFRED's rules); instances
        in number order."""
        classes = {r.cls for r in self.scene.receptacles.values()}
        valid = sorted((c for c in classes if holds(c, cls)), key=lambda c: (c in last, -prior(c, cls), c))
        others = sorted(classes - set(valid))
        plausible = [r for c in valid for r in self.scene.of_class(c)]
        return plausible + [r for c in others for r in self.scene.of_class(c)], plausible

    @staticmethod
    def places(order: list[str]) -> str:
        """ "countertop 1 2 3, fridge 1, cabinet 4 5": a search order, its instances grouped by class."""
        groups: list[tuple[str, list[str]]] = []
        for r in order:
            base, _, num = r.rpartition(" ")
            if groups and groups[-1][0] == base:
                groups[-1][1].append(num)
            else:
                groups.append((base, [num]))
        return ", ".join(f"{b} {' '.join(n)}" for b, n in groups)

    # -- handling objects -----------------------------------------------------------------------------------
    def take(self, o: str, r: str, kind: str = "recall", **fields: str) -> None:
        self.approach(r, kind, item=o, recep=r, **fields)
        if not self.visible(r):
            self.say("open", f"open {r}", recep=r, a_obj=_a(self.obj))
            self.opened.add(r)
        self.say("take", f"take {o} from {r}", item=o, recep=r)
        self.contents[r].remove(o)
        self.look(r)

    def put(self, o: str, target: str, held: str) -> None:
        self.approach(target, "to_target", item=o, target=target, held=held)
        if not self.visible(target):
            self.say("open_target", f"open {target}", target=target, item=o)
            self.opened.add(target)
        self.say("place", f"move {o} to {target}", item=o, target=target)
        self.contents[target].append(o)
        self.look(target)

    # -- the task -------------------------------------------------------------------------------------------
    def play(self, description: str) -> list[ExpertStep]:
        g = self.goal
        appliance = APPLIANCE.get(g.task_type, "")
        last = {c for c in (g.parent_target, appliance) if c}
        order, plausible = self.search_order(g.object_target, last)

        def ok(o: str, r: str) -> bool:
            # An object already in a goal receptacle of a plain pick task is done, not to be fetched.
            return g.task_type not in _PLAIN_PICK or self.rec(r).cls != g.parent_target

        task = self.rng.choice(_TASK_RESTATE).format(desc=description)
        fields = {"obj": self.obj, "a_obj": _a(self.obj), "likely": self.places(plausible or order), "task": task}
        o, r = self.find(g.object_target, ok, order, "plan", scope=set(plausible), **fields)
        self.take(o, r)
        if g.task_type == "look_at_obj_in_light":
            self.light(o)
            return self.steps
        held = o
        if appliance:
            app, verb = self.scene.of_class(appliance)[0], g.verb
            self.approach(app, "to_appliance", item=o, app=app, verb=verb, state=_STATE_WORD[verb])
            self.say("appliance", f"{verb} {o} with {app}", item=o, app=app, verb=verb)
            held = f"the {_STATE_WORD[verb]} {o}"
        target = self.scene.of_class(g.parent_target)[0]
        self.put(o, target, held)
        if g.task_type == "pick_two_obj_and_place":
            o, r = self.second(order, plausible, target, ok)
            self.put(o, target, o)
        return self.steps

    def second(self, order: list[str], plausible: list[str], target: str,
               ok: Callable[[str, str], bool]) -> tuple[str, str]:
        """Fetch a second object of the class (the goal wants two in the same receptacle)."""
        fields = {"obj": self.obj, "a_obj": _a(self.obj), "target": target}
        hit = self.in_sight(self.goal.object_target, ok)
        if hit:
            where = f"I saw {hit[0]} in {hit[1]} earlier, so I go back there."
            self.take(*hit, kind="second", where=where, **fields)
            return hit
        rest = [r for r in order if r not in self.known]
        left = [r for r in rest if r in plausible] or rest
        where = f"Left to search: {self.places(left)}. Next: {left[0]}." if left else "I keep searching."
        hit = self.find(self.goal.object_target, ok, order, "second", scope=set(plausible), where=where, **fields)
        self.take(*hit)
        return hit

    def light(self, item: str) -> None:
        """Find a desk lamp (remembered, or by searching where lamps stand) and switch it on while holding `item`."""
        toggle = self.goal.toggle_target or LAMP
        lamp = toggle.lower()
        hit = self.in_sight(toggle, lambda o, r: True)
        if hit:
            self.approach(hit[1], "lamp_recall", item=item, lamp_item=hit[0], recep=hit[1])
        else:
            order, _ = self.search_order(toggle, set())
            holders = [r for r in order if self.rec(r).cls in LAMP_HOLDERS and r not in self.known]
            order = holders + [r for r in order if r not in holders]
            hit = self.find(toggle, lambda o, r: True, order, "lamp_plan", scope=set(holders), item=item, lamp=lamp,
                            obj=lamp, a_obj=_a(lamp), likely=self.places(holders or order))
            self.approach(hit[1], "lamp_recall", item=item, lamp_item=hit[0], recep=hit[1])
        self.say("use_lamp", f"use {hit[0]}", item=item, lamp_item=hit[0])


def explore(scene: Scene, goal: Goal, description: str, rng: random.Random) -> list[ExpertStep]:
    """The expert's whole demonstration for a game, from its scene, ALFRED goal and task sentence."""
    return _Explorer(scene, goal, rng).play(description)
