"""The 120 ALFRED rooms the `alfworld` wheel ships, as receptacles at locations plus the object classes present.

Read from `alfworld/gen/layouts/FloorPlan*-{objects,openable}.json` and the rules in `alfworld.gen.constants`;
nothing here is invented except positions for receptacles the layout files do not place (stove burners,
toasters, towel holders, ...), which are fixed per room.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import alfworld.gen.constants as C

LAYOUTS_DIR = Path(C.__file__).parent / "layouts"

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)

# ALFWorld's out-of-distribution rooms: the scene numbers ALFRED's generator holds out of training
# (`constants.TEST_SCENE_NUMBERS`: FloorPlan 1-6, 201-206, 301-306, 401-406). Train and val share the other 96
# rooms (val is ALFWorld's "valid_seen": new games in seen rooms); test uses only the held-out 24.
SPLIT_FLOORPLANS: dict[str, tuple[int, ...]] = {
    "train": tuple(sorted(C.TRAIN_SCENE_NUMBERS)),
    "val": tuple(sorted(C.TRAIN_SCENE_NUMBERS)),
    "test": tuple(sorted(C.TEST_SCENE_NUMBERS)),
}

# Which receptacle a task uses to change the object's state, as in ALFWorld's PDDL domain (CleanObject needs
# SinkBasinType, HeatObject MicrowaveType, CoolObject FridgeType).
APPLIANCE = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
ACTION_PROPERTY = {
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}
ROOM_KINDS = {kind: set(numbers) for kind, numbers in C.SCENE_TYPE.items()}
LAMP = "DeskLamp"
# Desk lamps stand on these (VAL_RECEPTACLE_OBJECTS has no entry for lamps: they are not pickupable).
LAMP_HOLDERS = ("Desk", "SideTable", "Dresser")

STATIC_RECEPTACLES = frozenset(C.RECEPTACLES) - C.MOVABLE_RECEPTACLES_SET
# Every class that can be put somewhere can be picked up; the rest (windows, chairs, stove knobs) stay out.
PICKUPABLE = frozenset(o for objs in C.VAL_RECEPTACLE_OBJECTS.values() for o in objs if "Sliced" not in o)
# ALFRED ids of sink and bathtub basins hang off the fixture's id: "Sink|+00.94|+00.94|+02.65|SinkBasin".
BASIN_OF = {"Sink": "SinkBasin", "Bathtub": "BathtubBasin"}
# Receptacles the layout files do not place, and how many a room has.
SYNTHESIZED_COUNT = {"StoveBurner": 4}


@dataclass(frozen=True)
class Receptacle:
    id: str  # ALFRED object id, e.g. "Cabinet|+00.68|+00.50|-02.20"
    cls: str  # "Cabinet"
    loc: tuple[int, int, int, int]  # ALFRED navigation point: x, z (grid of 0.25 m), rotation/90, horizon


@dataclass(frozen=True)
class Room:
    floorplan: int
    kind: str
    receptacles: tuple[Receptacle, ...]
    object_classes: tuple[str, ...]  # pickupable classes present in the room
    has_lamp: bool

    @property
    def receptacle_classes(self) -> frozenset[str]:
        return frozenset(r.cls for r in self.receptacles)


def holds(receptacle_cls: str, object_cls: str) -> bool:
    """ALFRED's rule: can an object of this class be put in/on a receptacle of that class."""
    if object_cls == LAMP:
        return receptacle_cls in LAMP_HOLDERS
    return object_cls in C.VAL_RECEPTACLE_OBJECTS.get(receptacle_cls, ())


def alfred_number(value: float) -> str:
    # ALFRED's id format: signed, two decimals, zero unsigned ("+00.68", "-02.20", "00.00").
    return "00.00" if abs(value) < 0.005 else f"{value:+06.2f}"


def _loc_from_pose(pose: list[float]) -> tuple[int, int, int, int]:
    x, z, rotation, horizon = pose
    step = C.AGENT_STEP_SIZE
    return int(round(x / step)), int(round(z / step)), int(round(rotation / 90)) % 4, int(round(horizon))


def _room_kind(floorplan: int) -> str:
    return next(kind for kind, numbers in ROOM_KINDS.items() if floorplan in numbers)


@cache
def load_room(floorplan: int) -> Room:
    classes = json.loads((LAYOUTS_DIR / f"FloorPlan{floorplan}-objects.json").read_text())
    openable = json.loads((LAYOUTS_DIR / f"FloorPlan{floorplan}-openable.json").read_text())
    present = set(classes)
    receptacles: list[Receptacle] = []
    for object_id, pose in sorted(openable.items()):
        cls = object_id.split("|")[0]
        if cls in BASIN_OF:
            if BASIN_OF[cls] not in present:
                continue
            object_id, cls = f"{object_id}|{BASIN_OF[cls]}", BASIN_OF[cls]
        if cls in STATIC_RECEPTACLES:
            receptacles.append(Receptacle(object_id, cls, _loc_from_pose(pose)))
    receptacles += _synthesize_missing(floorplan, present, receptacles)
    lamp = LAMP in present and any(r.cls in LAMP_HOLDERS for r in receptacles)
    pickable = tuple(sorted(c for c in present if c in PICKUPABLE and any(holds(r.cls, c) for r in receptacles)))
    return Room(floorplan, _room_kind(floorplan), tuple(receptacles), pickable, lamp)


def _synthesize_missing(floorplan: int, present: set[str], placed: list[Receptacle]) -> list[Receptacle]:
    """Receptacles the room has but the layout files do not place, at fixed pseudo-positions per room."""
    rng = random.Random(f"FloorPlan{floorplan}/synthesized")
    have = {r.cls for r in placed}
    used = {r.loc for r in placed}
    xs = [r.loc[0] for r in placed] or [0]
    zs = [r.loc[1] for r in placed] or [0]
    out: list[Receptacle] = []
    missing = sorted(c for c in present if c in STATIC_RECEPTACLES and c not in have)
    for cls in missing:
        for _ in range(SYNTHESIZED_COUNT.get(cls, 1)):
            while True:
                loc = (rng.randint(min(xs) - 2, max(xs) + 2), rng.randint(min(zs) - 2, max(zs) + 2),
                       rng.randrange(4), rng.choice((0, 30, 45, 60)))
                if loc not in used:
                    break
            used.add(loc)
            coords = [loc[0] * C.AGENT_STEP_SIZE + rng.uniform(-0.5, 0.5), rng.uniform(0.0, 1.2),
                      loc[1] * C.AGENT_STEP_SIZE + rng.uniform(-0.5, 0.5)]
            object_id = "|".join([cls.removesuffix("Basin") if cls in BASIN_OF.values() else cls,
                                  *map(alfred_number, coords)])
            if cls in BASIN_OF.values():
                object_id += f"|{cls}"
            out.append(Receptacle(object_id, cls, loc))
    return out


def feasible(room: Room, task_type: str) -> bool:
    """Could ALFRED pose this task type in this room (room kind, appliance, lamp, a fitting object)?"""
    if room.kind not in C.GOALS_VALID[task_type]:
        return False
    if task_type == "look_at_obj_in_light":
        return room.has_lamp and bool(room.object_classes)
    appliance = APPLIANCE.get(task_type)
    if appliance and appliance not in room.receptacle_classes:
        return False
    return any(target_parents(room, task_type, obj) for obj in candidate_objects(room, task_type))


def candidate_objects(room: Room, task_type: str) -> list[str]:
    prop = ACTION_PROPERTY.get(task_type)
    if prop is None:
        return list(room.object_classes)
    return [o for o in room.object_classes if o in C.VAL_ACTION_OBJECTS[prop]]


def target_parents(room: Room, task_type: str, obj: str) -> list[str]:
    """Receptacle classes the object can be put in as the goal, leaving a class it can start in."""
    valid = sorted(c for c in room.receptacle_classes if holds(c, obj) and c != APPLIANCE.get(task_type))
    return [p for p in valid if any(s != p for s in start_classes(room, task_type, obj))]


def start_classes(room: Room, task_type: str, obj: str) -> list[str]:
    # The object never starts inside the appliance the task needs ("cool an apple" that sits in the fridge).
    return sorted(c for c in room.receptacle_classes if holds(c, obj) and c != APPLIANCE.get(task_type))


@cache
def rooms_for(split: str, task_type: str) -> tuple[Room, ...]:
    return tuple(room for n in SPLIT_FLOORPLANS[split] if feasible(room := load_room(n), task_type))


# How likely an object sits on/in each receptacle class. The generator places objects by it and the expert
# searches by it, the way a person looks on counters and tables before opening every cabinet.
PRIOR = {
    "CounterTop": 5, "DiningTable": 5, "Desk": 4, "SideTable": 4, "CoffeeTable": 4, "Bed": 4, "Sofa": 4,
    "TowelHolder": 4, "HandTowelHolder": 4, "ToiletPaperHanger": 4, "Fridge": 3, "Dresser": 3, "Shelf": 3,
    "ArmChair": 3, "Toilet": 3, "LaundryHamper": 3, "Cabinet": 2, "Drawer": 2, "SinkBasin": 2, "BathtubBasin": 2,
    "StoveBurner": 2, "CoffeeMachine": 2, "TVStand": 2, "Ottoman": 2, "Cart": 2, "Microwave": 1, "Toaster": 1,
    "GarbageCan": 1, "Safe": 1,
}
_FOOD = {"Apple", "Bread", "Egg", "Lettuce", "Potato", "Tomato"}
_UTENSILS = {"ButterKnife", "Fork", "Knife", "Ladle", "Spatula", "Spoon"}
_DISHES = {"Bowl", "Cup", "Mug", "Plate"}
_SMALL = {"CD", "CellPhone", "CreditCard", "KeyChain", "Pen", "Pencil", "Watch"}


def prior(receptacle_cls: str, object_cls: str) -> float:
    weight = float(PRIOR.get(receptacle_cls, 1))
    if (receptacle_cls == "Fridge" and object_cls in _FOOD) or (receptacle_cls == "Drawer" and object_cls in _UTENSILS):
        weight *= 2.5
    if receptacle_cls == "Cabinet" and object_cls in _DISHES | {"Pan", "Pot", "Kettle", "SoapBottle"}:
        weight *= 2
    if receptacle_cls == "Drawer" and object_cls in _SMALL:
        weight *= 2
    if receptacle_cls == "StoveBurner" and object_cls in {"Pan", "Pot", "Kettle"}:
        weight *= 2.5
    return weight
