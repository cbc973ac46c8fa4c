"""What an ALFWorld game's PDDL problem says about the room, under the names the player sees ("cabinet 3").

The same reading serves generated games and real ALFWorld ones; names come from ALFWorld's own `Demangler`,
fed the entities the engine sees, so "apple 2" here is "apple 2" in the observations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace

from alfworld.agents.utils.misc import Demangler

_FACT = re.compile(r"\(\s*([A-Za-z][\w-]*)((?:\s+[^\s()]+)+)\s*\)")


@dataclass(frozen=True)
class SceneReceptacle:
    name: str  # "cabinet 3"
    cls: str  # "Cabinet"
    loc: str
    openable: bool


@dataclass(frozen=True)
class Scene:
    receptacles: dict[str, SceneReceptacle]  # by name, in the engine's numbering
    contents: dict[str, tuple[str, ...]]  # receptacle name -> object names in it
    object_cls: dict[str, str]  # object name -> class ("Apple")
    agent_loc: str

    def of_class(self, cls: str) -> list[str]:
        """Receptacle names of a class in numeric order ("cabinet 1", "cabinet 2", ...)."""
        return sorted((n for n, r in self.receptacles.items() if r.cls == cls), key=_name_key)


def _name_key(name: str) -> tuple[str, int]:
    base, _, num = name.rpartition(" ")
    return (base, int(num)) if num.isdigit() else (name, 0)


def _init_section(problem: str) -> str:
    start = problem.find("(:init")
    end = problem.find("(:goal")
    if start < 0 or end < 0:
        raise ValueError("PDDL problem without an (:init ...) or (:goal ...) section")
    return problem[start:end]


def demangled_names(entity_ids: set[str]) -> dict[str, str]:
    """ALFWorld's display names for the engine's (lower-cased) entity ids, exactly as AlfredDemangler assigns them."""
    infos = {e: SimpleNamespace(id=e) for e in entity_ids}
    demangler = Demangler(game_infos=infos)
    return {e: demangler.demangle_alfred_name(e).strip() for e in entity_ids}


def parse_scene(problem: str) -> Scene:
    """Read receptacles, their contents, object classes and the agent's start from a problem's init facts."""
    facts = [(m.group(1).lower(), m.group(2).split()) for m in _FACT.finditer(_init_section(problem))]
    facts = [(p, [a.lower() for a in args]) for p, args in facts if p != "="]
    names = demangled_names({a for _, args in facts for a in args})

    def fact_map(pred: str) -> dict[str, str]:
        return {args[0]: args[1] for p, args in facts if p == pred and len(args) == 2}

    rtype, otype, at = fact_map("receptacletype"), fact_map("objecttype"), fact_map("receptacleatlocation")
    inside = [(args[0], args[1]) for p, args in facts if p == "inreceptacle"]
    openable = {args[0] for p, args in facts if p == "openable"}
    agent_loc = next(args[1] for p, args in facts if p == "atlocation")
    classes = _class_names(problem)
    receptacles = {
        names[r]: SceneReceptacle(names[r], classes.get(t, t), at[r], r in openable) for r, t in rtype.items() if r in at
    }
    contents: dict[str, list[str]] = {name: [] for name in receptacles}
    for o, r in inside:
        if names.get(r) in contents:
            contents[names[r]].append(names[o])
    object_cls = {names[o]: classes.get(t, t) for o, t in otype.items()}
    return Scene(receptacles, {k: tuple(v) for k, v in contents.items()}, object_cls, agent_loc)


def _class_names(problem: str) -> dict[str, str]:
    """'appletype' -> 'Apple', keeping ALFRED's capitalisation from the problem's declarations."""
    out = {}
    for m in re.finditer(r"\b(\w+)Type\s*-\s*[or]type", problem):
        out[f"{m.group(1)}type".lower()] = m.group(1)
    return out
