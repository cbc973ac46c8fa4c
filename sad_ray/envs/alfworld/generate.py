"""Generate ALFWorld games offline: one PDDL problem per task, from a shipped room layout and ALFRED's rules.

A game is a pure function of its `Task`. The files are ALFWorld's own format (`game.tw-pddl`: domain, grammar
with the task sentence, problem; `traj_data.json`: task type and `pddl_params`), so the real-data loader reads
them too. No planner runs here: every game is checked instead by playing the exploring expert on its scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

import alfworld.gen.constants as C
import alfworld.gen.goal_library as glib
from alfworld.agents.utils.misc import add_task_to_grammar
from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

from sad_ray.envs.alfworld.expert import Goal, explore
from sad_ray.envs.alfworld.layouts import (
    LAMP,
    LAMP_HOLDERS,
    Receptacle,
    Room,
    alfred_number,
    candidate_objects,
    holds,
    prior,
    rooms_for,
    start_classes,
    target_parents,
)
from sad_ray.envs.alfworld.scene import parse_scene
from sad_ray.envs.base import Task

# Bump when generated games change for the same task: the cache is keyed by it.
GENERATOR_VERSION = 1
# Below the default step limit (50) with room to spare: ALFRED too discards games whose plans run long.
MAX_EXPERT_STEPS = 40
PLACEMENT_TRIES = 12


@dataclass(frozen=True)
class Placed:
    id: str  # ALFRED object id, "Apple|+01.20|+00.95|-02.10"
    cls: str
    receptacle: Receptacle


@dataclass(frozen=True)
class Game:
    """A generated game: ALFWorld's `game.tw-pddl` content and `traj_data.json` content."""

    game: dict
    traj_data: dict


@cache
def _domain() -> str:
    with open(ALFRED_PDDL_PATH) as f:
        return f.read()


@cache
def _grammar() -> str:
    with open(ALFRED_TWL2_PATH) as f:
        return f.read()


def pddl_name(alfred_id: str) -> str:
    """ALFRED's id escaping for PDDL (`PlannedGameState.fix_pddl_str_chars`)."""
    for old, new in (("-", "_minus_"), ("#", "-"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        alfred_id = alfred_id.replace(old, new)
    return alfred_id


def loc_name(loc: tuple[int, int, int, int]) -> str:
    return pddl_name("loc|" + "|".join(str(v) for v in loc))


def sample_goal(room: Room, task_type: str, rng: random.Random) -> Goal:
    if task_type == "look_at_obj_in_light":
        return Goal(task_type, rng.choice(candidate_objects(room, task_type)), toggle_target=LAMP)
    objects = [o for o in candidate_objects(room, task_type) if target_parents(room, task_type, o)]
    obj = rng.choice(objects)
    return Goal(task_type, obj, parent_target=rng.choice(target_parents(room, task_type, obj)))


def _weighted(rng: random.Random, classes: list[str], obj: str) -> str:
    return rng.choices(classes, weights=[prior(c, obj) for c in classes])[0]


def _coords(receptacle: Receptacle) -> list[float]:
    parts = receptacle.id.split("|")[1:4]
    return [float(p) for p in parts]


def sample_objects(room: Room, goal: Goal, rng: random.Random) -> list[Placed]:
    """Target instances in receptacles they can start in, a lamp where the room has one, and distractors."""
    by_class: dict[str, list[Receptacle]] = {}
    for r in room.receptacles:
        by_class.setdefault(r.cls, []).append(r)
    taken_ids: set[str] = set()

    def place(cls: str, classes: list[str]) -> Placed:
        receptacle = rng.choice(by_class[_weighted(rng, classes, cls)])
        while True:
            x, y, z = (v + rng.uniform(-0.4, 0.4) for v in _coords(receptacle))
            object_id = "|".join([cls, alfred_number(x), alfred_number(y + 0.1), alfred_number(z)])
            if object_id not in taken_ids:
                taken_ids.add(object_id)
                return Placed(object_id, cls, receptacle)

    target = goal.object_target
    starts = [c for c in start_classes(room, goal.task_type, target) if c != goal.parent_target]
    count = rng.randint(2, 3) if goal.task_type == "pick_two_obj_and_place" else rng.randint(1, 3)
    placed = [place(target, starts) for _ in range(count)]
    if room.has_lamp:
        placed.append(place(LAMP, [c for c in LAMP_HOLDERS if c in by_class]))
    for cls in room.object_classes:
        if cls == target or rng.random() < 0.25:
            continue
        valid = [c for c in by_class if holds(c, cls)]
        placed += [place(cls, valid) for _ in range(rng.randint(1, 2))]
    return placed


def _agent_start(room: Room, rng: random.Random) -> tuple[int, int, int, int]:
    used = {r.loc for r in room.receptacles}
    xs, zs = [r.loc[0] for r in room.receptacles], [r.loc[1] for r in room.receptacles]
    while True:
        loc = (rng.randint(min(xs), max(xs)), rng.randint(min(zs), max(zs)), rng.randrange(4), 30)
        if loc not in used:
            return loc


def goal_pddl(goal: Goal) -> str:
    """ALFWorld's goal for the task type (`alfworld.gen.goal_library`), closing the problem as its files do."""
    text = glib.gdict[goal.task_type]["pddl"].format(
        obj=goal.object_target, recep=goal.parent_target, toggle=goal.toggle_target, mrecep="")
    return text.replace("#", "-")


def problem_pddl(name: str, room: Room, placed: list[Placed], goal: Goal, agent: tuple[int, int, int, int]) -> str:
    """A PDDL problem laid out like ALFWorld's `initial_state.pddl`: declarations, init facts, the goal."""
    object_classes = sorted({p.cls for p in placed} | {goal.object_target})
    receptacle_classes = sorted({r.cls for r in room.receptacles} | ({goal.parent_target} - {""}))
    objects = sorted(placed, key=lambda p: p.id)
    receptacles = sorted(room.receptacles, key=lambda r: r.id)
    locations = sorted({loc_name(r.loc) for r in receptacles} | {loc_name(agent)})
    declarations = (["agent1 - agent"] + [f"{c}Type - otype" for c in object_classes]
                    + [f"{c}Type - rtype" for c in receptacle_classes]
                    + [f"{pddl_name(p.id)} - object" for p in objects]
                    + [f"{pddl_name(r.id)} - receptacle" for r in receptacles]
                    + [f"{loc} - location" for loc in locations])
    can_contain = [f"(canContain {rc}Type {oc}Type)" for rc in receptacle_classes for oc in object_classes
                   if oc != LAMP and holds(rc, oc)]
    facts = _receptacle_facts(receptacles) + _object_facts(objects) + can_contain
    facts.append(f"(atLocation agent1 {loc_name(agent)})")
    indent = "\n        "
    return (f"\n(define (problem plan_{name})\n(:domain alfred)\n(:objects{indent}{indent.join(declarations)}\n        )\n"
            f"\n(:init{indent}{indent.join(facts)}\n        )\n\n{goal_pddl(goal)}")


def _receptacle_facts(receptacles: list[Receptacle]) -> list[str]:
    facts = [f"(receptacleType {pddl_name(r.id)} {r.cls}Type)" for r in receptacles]
    facts += [f"(openable {pddl_name(r.id)})" for r in receptacles if r.cls in C.OPENABLE_CLASS_SET]
    return facts + [f"(receptacleAtLocation {pddl_name(r.id)} {loc_name(r.loc)})" for r in receptacles]


# ALFRED's object affordances (VAL_ACTION_OBJECTS) and the PDDL predicates that carry them.
_AFFORDANCES = (("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"),
                ("Toggleable", "toggleable"), ("Sliceable", "sliceable"))


def _object_facts(objects: list[Placed]) -> list[str]:
    facts = [f"(objectType {pddl_name(p.id)} {p.cls}Type)" for p in objects]
    facts += [f"(pickupable {pddl_name(p.id)})" for p in objects if p.cls != LAMP]
    facts += [f"(isReceptacleObject {pddl_name(p.id)})" for p in objects if p.cls in C.MOVABLE_RECEPTACLES_SET]
    for prop, predicate in _AFFORDANCES:
        facts += [f"({predicate} {pddl_name(p.id)})" for p in objects if p.cls in C.VAL_ACTION_OBJECTS[prop]]
    facts += [f"(inReceptacle {pddl_name(p.id)} {pddl_name(p.receptacle.id)})" for p in objects]
    return facts + [f"(objectAtLocation {pddl_name(p.id)} {loc_name(p.receptacle.loc)})" for p in objects]


def task_description(goal: Goal, rng: random.Random) -> str:
    """ALFWorld's templated task sentence (`goal_library` templates), picked by our RNG instead of the global one."""
    template = rng.choice(glib.gdict[goal.task_type]["templates"])
    return template.format(obj=goal.object_target.lower(), recep=goal.parent_target.lower(),
                           toggle=goal.toggle_target.lower(), mrecep="")


def traj_data(task: Task, room: Room, goal: Goal, description: str) -> dict:
    """The `traj_data.json` fields ALFWorld's loaders read (task type, pddl_params, scene, annotation)."""
    return {
        "task_id": f"sad_ray_{task.split}_{task.task_type}_{task.seed}",
        "task_type": goal.task_type,
        "pddl_params": {"object_target": goal.object_target, "parent_target": goal.parent_target,
                        "toggle_target": goal.toggle_target, "mrecep_target": "", "object_sliced": False},
        "scene": {"floor_plan": f"FloorPlan{room.floorplan}", "scene_num": room.floorplan},
        "turk_annotations": {"anns": [{"task_desc": description}]},
        "generator": {"name": "sad_ray", "version": GENERATOR_VERSION, "task": task.id},
    }


def game_file(problem: str, description: str) -> dict:
    # add_task_to_grammar with the annotation path, so the sentence is ours (seeded) and ALFWorld inserts it.
    grammar = add_task_to_grammar(_grammar(), {"turk_annotations": {"anns": [{"task_desc": description}]}},
                                  goal_desc_human_anns_prob=1.0, rng=random.Random(0))
    return {"pddl_domain": _domain(), "grammar": grammar, "pddl_problem": problem, "solvable": True}


def generate_game(task: Task) -> Game:
    """The game for a task: a room of the task's split, a goal, objects placed until the expert's plan is short."""
    rooms = rooms_for(task.split, task.task_type)
    if not rooms:
        raise ValueError(f"no room of split {task.split!r} can host {task.task_type}")
    # A string seed hashes with SHA-512: the same on every machine and Python run (no PYTHONHASHSEED).
    rng = random.Random(f"sad-ray/alfworld/{task.split}/{task.task_type}/{task.seed}")
    for _ in range(100):
        room = rng.choice(rooms)
        goal = sample_goal(room, task.task_type, rng)
        description = task_description(goal, rng)
        for _ in range(PLACEMENT_TRIES):
            placed = sample_objects(room, goal, rng)
            problem = problem_pddl(f"sad_ray_{task.split}_{task.seed}", room, placed, goal, _agent_start(room, rng))
            steps = explore(parse_scene(problem), goal, description, random.Random(0))
            if len(steps) <= MAX_EXPERT_STEPS:
                return Game(game_file(problem, description), traj_data(task, room, goal, description))
    raise RuntimeError(f"could not generate a game for {task.id} with an expert plan under {MAX_EXPERT_STEPS} steps")
