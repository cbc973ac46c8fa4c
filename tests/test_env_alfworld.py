"""ALFWorld on its real engine: generated games are deterministic, split by room, cached, and won by the expert."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("alfworld")
pytest.importorskip("textworld")

from sad_ray.envs.alfworld import SPLIT_FLOORPLANS, TASK_TYPES, ALFWorldEnv, export_dataset  # noqa: E402
from sad_ray.envs.alfworld.layouts import APPLIANCE  # noqa: E402
from sad_ray.envs.alfworld.store import GAME_FILE, TRAJ_FILE, read_goal  # noqa: E402
from sad_ray.envs.base import Task  # noqa: E402
from sad_ray.envs.react import demonstration  # noqa: E402

log = logging.getLogger(__name__)

SEEDS_PER_TYPE = 20
_ENVS: dict[tuple[str, str | None], ALFWorldEnv] = {}


def _play(job: tuple[str, str | None, Task]) -> dict:
    """Play the expert's demonstration in a worker process (one engine per process and store)."""
    cache_dir, data_dir, task = job
    key = (cache_dir, data_dir)
    if key not in _ENVS:
        _ENVS[key] = ALFWorldEnv(cache_dir=cache_dir) if data_dir is None else ALFWorldEnv(data_dir=data_dir)
    env = _ENVS[key]
    try:
        episode = demonstration(env, task)
    except Exception as e:  # reported per task by the tests, not as one broken fixture
        return {"task": task, "error": repr(e)}
    return {"task": task, "turns": episode.turns[1:], "steps": episode.steps, "goal": read_goal(env.game_dir(task))}


def _play_all(jobs: list[tuple[str, str | None, Task]]) -> list[dict]:
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_play, jobs, chunksize=4))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("alfworld-cache")


@pytest.fixture(scope="module")
def env(cache_dir) -> ALFWorldEnv:
    return ALFWorldEnv(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def demos(env, cache_dir) -> list[dict]:
    """Every task type x SEEDS_PER_TYPE train games, generated from an empty cache and played by the expert."""
    tasks = env.tasks("train", SEEDS_PER_TYPE * len(TASK_TYPES))
    t0 = time.perf_counter()
    assert env.prepare(tasks, workers=2) == len(tasks)
    t1 = time.perf_counter()
    results = _play_all([(str(cache_dir), None, t) for t in tasks])
    t2 = time.perf_counter()
    log.info("generated %d games in %.1fs, played them in %.1fs", len(tasks), t1 - t0, t2 - t1)
    return results


def _assistant(turn: dict) -> tuple[str, str]:
    thought, action = turn["content"].split("\nAction: ")
    return thought.removeprefix("Thought: "), action


def test_expert_wins_every_task_type(demos):
    errors = [f"{d['task'].id}: {d['error']}" for d in demos if "error" in d]
    assert not errors, errors
    wins = defaultdict(int)
    for d in demos:
        wins[d["task"].task_type] += 1
        # Every expert action is admissible: ALFWorld answers an inadmissible one with "Nothing happens.".
        assert all(t["content"] != "Nothing happens." for t in d["turns"] if t["role"] == "user"), d["task"].id
        assert d["steps"] <= 40
    assert wins == {t: SEEDS_PER_TYPE for t in TASK_TYPES}


def test_expert_searches_before_it_finds(demos):
    """Demonstrations contain search: some visit receptacles that do not hold the object."""
    searching = 0
    for d in demos:
        if "error" in d:
            continue
        goal, turns = d["goal"], d["turns"]
        skip = {goal.parent_target.lower(), APPLIANCE.get(goal.task_type, "").lower(), "desk", "sidetable", "dresser"}
        for i in range(1, len(turns) - 1, 2):
            _, action = _assistant(turns[i])
            observation = turns[i + 1]["content"]
            verb, _, recep = action.partition(" ")
            if action.startswith(("go to ", "open ")) and recep.removeprefix("to ").split()[0] not in skip:
                if goal.object_target.lower() + " " not in observation and "closed" not in observation:
                    searching += 1
                    break
    assert searching >= len(demos) // 3, f"only {searching} of {len(demos)} demonstrations searched"


def _shape(thought: str) -> str:
    """A thought with its entities blanked, so only the phrasing is compared."""
    return re.sub(r"\b[a-z]+ \d+\b|\([\d, -]+\)", "X", thought.lower())


def test_thoughts_vary_and_are_grounded(demos):
    phrasings: dict[str, set[str]] = defaultdict(set)
    for d in demos:
        for turn in d.get("turns", []):
            if turn["role"] != "assistant":
                continue
            thought, action = _assistant(turn)
            verb = action.split()[0]
            phrasings[verb].add(_shape(thought))
            # Grounded: the thought names what the action touches (receptacle or object), not a stock sentence.
            if verb in ("take", "move", "open", "use"):
                assert action.split()[1] in thought.lower(), (thought, action)
    for verb in ("go", "open", "take", "move", "heat", "cool", "clean", "use"):
        assert len(phrasings[verb]) > 1, f"only one phrasing for {verb!r}: {phrasings[verb]}"


def test_generation_is_deterministic(env, demos, tmp_path):
    """Same task -> same game bytes, in a fresh cache and in a process with another hash seed."""
    tasks = [Task("alfworld", t, 7, "test") for t in TASK_TYPES]
    other = ALFWorldEnv(cache_dir=tmp_path / "other")
    for task in tasks:
        assert (env.game_dir(task) / GAME_FILE).read_bytes() == (other.game_dir(task) / GAME_FILE).read_bytes()
    code = ("import sys; from sad_ray.envs.alfworld import ALFWorldEnv; from sad_ray.envs.base import Task; "
            "print(ALFWorldEnv(cache_dir=sys.argv[1]).game_dir(Task('alfworld', sys.argv[2], 7, 'test')))")
    task = tasks[-1]
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "third"), task.task_type], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    third = Path(out.stdout.strip().splitlines()[-1])
    assert (third / GAME_FILE).read_bytes() == (env.game_dir(task) / GAME_FILE).read_bytes()
    first = env.reset(tasks[0])
    assert first == other.reset(tasks[0])
    assert first.startswith("You are in the middle of a room.") and "Your task is to: " in first


def test_game_files_are_alfworld_format(env):
    task = Task("alfworld", "pick_heat_then_place_in_recep", 3, "val")
    game = json.loads((env.game_dir(task) / GAME_FILE).read_text())
    traj = json.loads((env.game_dir(task) / TRAJ_FILE).read_text())
    assert {"pddl_domain", "grammar", "pddl_problem", "solvable"} <= set(game)
    assert "(define (problem" in game["pddl_problem"] and "(:goal" in game["pddl_problem"]
    assert "UNKNOWN GOAL" not in game["grammar"]
    assert traj["task_type"] == task.task_type
    assert traj["pddl_params"]["object_target"] and traj["pddl_params"]["parent_target"]


def test_invalid_actions_get_alfworld_feedback(env):
    task = env.tasks("train", 1)[0]
    env.reset(task)
    for bad in ("fly to the moon", "", "   ", "take unicorn 1 from table 9", "go to cabinet 999", "\x00"):
        result = env.step(bad)
        assert result.observation == "Nothing happens."
        assert result.info["won"] is False and not result.done and result.reward == 0.0
        assert "look" in result.info["admissible"] and "inventory" in result.info["admissible"]
    # Case, spacing and a trailing period do not change a command.
    assert env.step("  LOOK. ").observation != "Nothing happens."


def test_step_limit_ends_as_failure(cache_dir):
    env = ALFWorldEnv(cache_dir=cache_dir, max_steps=3)
    env.reset(env.tasks("train", 1)[0])
    results = [env.step("look") for _ in range(3)]
    assert [r.done for r in results] == [False, False, True]
    assert results[-1].info["truncated"] and results[-1].info["won"] is False
    with pytest.raises(RuntimeError):
        env.step("look")


def test_splits_do_not_overlap(env):
    assert not set(SPLIT_FLOORPLANS["test"]) & set(SPLIT_FLOORPLANS["train"])
    assert SPLIT_FLOORPLANS["train"] == SPLIT_FLOORPLANS["val"]  # val is ALFWorld's valid_seen
    tasks = {s: env.tasks(s, 24) for s in ("train", "val", "test")}
    ids = {s: {t.id for t in ts} for s, ts in tasks.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    problems = {s: {json.loads((env.game_dir(t) / GAME_FILE).read_text())["pddl_problem"].split("(:init")[1]
                    for t in ts} for s, ts in tasks.items()}
    assert not problems["train"] & problems["val"]
    rooms = {s: {json.loads((env.game_dir(t) / TRAJ_FILE).read_text())["scene"]["scene_num"] for t in ts}
             for s, ts in tasks.items()}
    assert rooms["test"] <= set(SPLIT_FLOORPLANS["test"])
    assert not rooms["test"] & (rooms["train"] | rooms["val"])
    assert [t.task_type for t in tasks["train"][:6]] == list(TASK_TYPES)  # tasks cycle through types
    assert env.tasks("train", 6, start=6) == tasks["train"][6:12]


def test_cache_is_used_the_second_time(tmp_path):
    task = Task("alfworld", "pick_cool_then_place_in_recep", 11, "train")
    first = ALFWorldEnv(cache_dir=tmp_path)
    path = first.game_dir(task)
    assert first.store.generated == 1
    stamp = (path / GAME_FILE).stat().st_mtime_ns
    second = ALFWorldEnv(cache_dir=tmp_path)
    observation = second.reset(task)
    assert second.store.generated == 0 and (path / GAME_FILE).stat().st_mtime_ns == stamp
    assert observation == first.reset(task)
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # atomic writes leave no temp files


def test_real_data_loader(env, cache_dir, tmp_path, monkeypatch):
    """A directory laid out like `alfworld-download`'s (valid_unseen -> test) loads and plays."""
    tasks = [t for s in ("train", "val", "test") for t in env.tasks(s, len(TASK_TYPES))]
    data = export_dataset(tasks, tmp_path / "alfworld", cache_dir=cache_dir)
    assert len(list((data / "json_2.1.1" / "valid_unseen").glob(f"*/*/{GAME_FILE}"))) == len(TASK_TYPES)
    real = ALFWorldEnv(data_dir=data)
    test_tasks = real.tasks("test", 10)
    assert len(test_tasks) == len(TASK_TYPES)  # as many as there are games, cycling types
    assert {t.task_type for t in test_tasks} == set(TASK_TYPES)
    for task in test_tasks:
        assert "valid_unseen" in str(real.game_dir(task))
    results = _play_all([(str(cache_dir), str(data), t) for t in test_tasks + real.tasks("val", 2)])
    assert [r.get("error") for r in results] == [None] * len(results)
    monkeypatch.setenv("ALFWORLD_DATA", str(data))
    assert isinstance(ALFWorldEnv().store, type(real.store))
    # Games ALFWorld marks unsolvable are skipped, as its own loader does.
    game_file = real.game_dir(real.tasks("train", 1)[0]) / GAME_FILE
    game_file.write_text(json.dumps({**json.loads(game_file.read_text()), "solvable": False}))
    assert len(ALFWorldEnv(data_dir=data).tasks("train", 10)) == len(TASK_TYPES) - 1


def test_real_data_folders_without_playable_games_are_errors_naming_them(env, cache_dir, tmp_path, monkeypatch):
    from sad_ray.envs.alfworld.store import GeneratedGames

    empty = tmp_path / "empty"
    empty.mkdir()
    expected = "expected json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/game.tw-pddl"
    with pytest.raises(FileNotFoundError, match=re.escape(f"data_dir {empty} has no ALFWorld games ({expected}, as "
                                                          "alfworld-download writes); found an empty folder")):
        ALFWorldEnv(data_dir=empty)
    (empty / "logic").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape("found logic/")):
        ALFWorldEnv(data_dir=empty)
    no_games = tmp_path / "no-games"
    (no_games / "json_2.1.1" / "train" / "pick_and_place_simple-Apple-None-Fridge-1").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(f"data_dir {no_games}: no game.tw-pddl in train/, valid_seen/, "
                                                   "valid_unseen/ two folders down")):
        ALFWorldEnv(data_dir=no_games)

    # Games ALFWorld would not play, every one: counted by why.
    data = export_dataset(env.tasks("train", 2), tmp_path / "alfworld", cache_dir=cache_dir)
    unsolvable, corrupt = sorted((data / "json_2.1.1").glob(f"*/*/*/{GAME_FILE}"))
    original = unsolvable.read_text()
    unsolvable.write_text(json.dumps({**json.loads(original), "solvable": False}))
    corrupt.write_text('{"pddl_domain": "(define')
    with pytest.raises(ValueError, match=re.escape(f"data_dir {data}: 0 of 2 games are playable: ")) as err:
        ALFWorldEnv(data_dir=data)
    assert "1 marked unsolvable" in str(err.value) and "1 with an unreadable game.tw-pddl" in str(err.value)

    # One playable train game: a split without games is an error naming the folder and what there is.
    unsolvable.write_text(original)
    real = ALFWorldEnv(data_dir=data)
    assert len(real.tasks("train", 5)) == 1
    with pytest.raises(ValueError, match=re.escape(
            f"data_dir {data / 'json_2.1.1'}: no playable test games (valid_unseen/) of types {', '.join(TASK_TYPES)}; "
            "playable games per folder: train 1, valid_seen 0, valid_unseen 0")):
        real.tasks("test", 5)

    # $ALFWORLD_DATA someone set is named the same way; alfworld's own (empty) default is not a choice.
    monkeypatch.setenv("ALFWORLD_DATA", str(empty))
    with pytest.raises(FileNotFoundError, match=re.escape(f"$ALFWORLD_DATA {empty} has no ALFWorld games")):
        ALFWorldEnv()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "home" / ".cache" / "alfworld"))
    assert isinstance(ALFWorldEnv().store, GeneratedGames)
    monkeypatch.setenv("ALFWORLD_DATA", str(data))
    assert len(ALFWorldEnv().tasks("train", 5)) == 1

    # The jobs' config: $ALFWORLD_DATA is not shadowed by the generated games' cache, and a folder set in the
    # config is named by its key.
    from sad_ray.config import load_config
    from sad_ray.envs import make_env
    from sad_ray.stages import env_kwargs

    job_env = make_env("alfworld", **env_kwargs(load_config(None, [f"paths.cache_dir={tmp_path / 'cache'}"]))["alfworld"])
    assert len(job_env.tasks("train", 5)) == 1
    monkeypatch.delenv("ALFWORLD_DATA")
    with pytest.raises(FileNotFoundError, match=re.escape(f"environments.alfworld.data_dir {empty} has no ALFWorld")):
        make_env("alfworld", **env_kwargs(load_config(None, [f"environments.alfworld.data_dir={empty}"]))["alfworld"])


def test_planner_plan_is_an_oracle(env):
    for task in env.tasks("train", 2, ["pick_and_place_simple"]):
        plan = env.planner_plan(task)
        env.reset(task)
        results = [env.step(a) for a in plan]
        assert results and results[-1].info["won"]
        assert len(plan) <= len(env.expert(task))


def test_cached_engine_matches_alfworlds_own(env):
    """The engine's caches change nothing: same observations and admissible commands as a plain PddlEnv."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs import PddlEnv

    plain = AlfredDemangler()(PddlEnv(textworld.EnvInfos(admissible_commands=True, won=True)))
    for task in env.tasks("val", 2, ["look_at_obj_in_light", "pick_clean_then_place_in_recep"]):
        plain.load(str(env.game_dir(task) / GAME_FILE))
        state = plain.reset()
        assert env.reset(task) == state.feedback.split("\n\n", 1)[1]
        assert env.admissible == state.admissible_commands
        for action in env.expert(task):
            state, _, _ = plain.step(action)
            result = env.step(action)
            assert (result.observation, result.info["admissible"]) == (state.feedback, state.admissible_commands)
        assert result.info["won"] and state["won"]
