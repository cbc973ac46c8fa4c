"""Where games come from: generated on demand into a cache, or a directory of real ALFWorld games.

Both hand out game directories laid out as ALFWorld's: `game.tw-pddl` (domain, grammar, problem) beside
`traj_data.json` (task type, pddl_params). `export_dataset` writes generated games in `alfworld-download`'s
layout (`json_2.1.1/{train,valid_seen,valid_unseen}/<task>-<obj>-<mrecep>-<parent>-<scene>/trial_*/`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import count
from pathlib import Path

from sad_ray.envs.alfworld.expert import Goal
from sad_ray.envs.alfworld.generate import GENERATOR_VERSION, generate_game
from sad_ray.envs.alfworld.layouts import TASK_TYPES
from sad_ray.envs.base import Task

log = logging.getLogger(__name__)

GAME_FILE = "game.tw-pddl"
TRAJ_FILE = "traj_data.json"
# Our splits -> ALFWorld's folders: test is the out-of-distribution split (unseen rooms).
ALFWORLD_SPLITS = {"train": "train", "val": "valid_seen", "test": "valid_unseen"}
POOL_MIN_GAMES = 64


def default_cache_dir() -> Path:
    return Path(os.environ.get("SAD_RAY_CACHE", "~/.cache/sad-ray")).expanduser() / "alfworld"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_goal(game_dir: Path) -> Goal:
    """ALFRED's task parameters: from `traj_data.json`, else from the folder name ALFWorld gives each task."""
    traj = game_dir / TRAJ_FILE
    if traj.exists():
        data = json.loads(traj.read_text())
        p = data["pddl_params"]
        return Goal(data["task_type"], p["object_target"], p.get("parent_target") or "", p.get("toggle_target") or "")
    task_type, obj, _mrecep, parent, _scene = game_dir.parent.name.split("-")
    if task_type == "look_at_obj_in_light":
        return Goal(task_type, obj, toggle_target=parent)
    return Goal(task_type, obj, parent_target=parent)


def _interleave(per_type: dict[str, int], types: Sequence[str], n: int, start: int) -> list[tuple[str, int]]:
    """Task i is type i % k, number i // k; types that run out of games are skipped."""
    out: list[tuple[str, int]] = []
    most = max((per_type.get(t, 0) for t in types), default=0)
    for i in count(start):
        if len(out) == n or i // len(types) >= most:
            return out
        task_type, seed = types[i % len(types)], i // len(types)
        if seed < per_type.get(task_type, 0):
            out.append((task_type, seed))
    return out


class GeneratedGames:
    """Games generated from the wheel's rooms, cached by task id and generator version."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.generated = 0  # games this store generated (not read from the cache)

    def tasks(self, split: str, n: int, types: Sequence[str], start: int) -> list[Task]:
        return [Task("alfworld", types[i % len(types)], i // len(types), split) for i in range(start, start + n)]

    def path(self, task: Task) -> Path:
        return self.root / f"v{GENERATOR_VERSION}" / task.split / task.task_type / str(task.seed)

    def game_dir(self, task: Task) -> Path:
        path = self.path(task)
        if not (path / GAME_FILE).exists():
            write_game(task, path)
            self.generated += 1
        return path

    def prepare(self, tasks: Sequence[Task], workers: int = 2) -> int:
        """Generate the missing games of `tasks` with a process pool; returns how many were generated."""
        missing = [t for t in tasks if not (self.path(t) / GAME_FILE).exists()]
        # A game takes a few milliseconds; a pool only pays for its start-up on large batches.
        if workers <= 1 or len(missing) < POOL_MIN_GAMES:
            for t in missing:
                self.game_dir(t)
            return len(missing)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(write_game, missing, [self.path(t) for t in missing], chunksize=4))
        self.generated += len(missing)
        return len(missing)


def write_game(task: Task, path: Path) -> Path:
    """Generate a task's game into `path`, atomically (the game file, written last, marks it complete)."""
    game = generate_game(task)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / TRAJ_FILE, json.dumps(game.traj_data))
    _atomic_write(path / GAME_FILE, json.dumps(game.game))
    log.debug("generated %s into %s", task.id, path)
    return path


def _solvable(game: Path) -> bool | None:
    """ALFWorld plays only games marked solvable; the flag closes the file, so its tail usually suffices.

    None when the file cannot be read as a game.
    """
    try:
        with open(game, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64))
            tail = f.read()
        if b'"solvable"' in tail:
            return b'"solvable": true' in tail
        data = json.loads(game.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return bool(data.get("solvable")) if isinstance(data, dict) else None


def _listing(folder: Path) -> str:
    """What a folder holds, for error messages."""
    if not folder.is_dir():
        return "no such folder"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return "an empty folder"
    return ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")


class ALFWorldData:
    """Real ALFWorld games (`alfworld-download`'s folder, or one laid out the same way).

    A task's seed is its index among the split's games of its type, sorted by path. A folder with no playable
    game is an error naming it (`setting` says where it came from: `data_dir` or `$ALFWORLD_DATA`).
    """

    def __init__(self, data_dir: str | Path, setting: str = "data_dir") -> None:
        root = Path(data_dir).expanduser()
        self.root = root / "json_2.1.1" if (root / "json_2.1.1").is_dir() else root
        self.setting = setting
        expected = f"expected json_2.1.1/{{{','.join(ALFWORLD_SPLITS.values())}}}/<task>/<trial>/{GAME_FILE}"
        if not any((self.root / d).is_dir() for d in ALFWORLD_SPLITS.values()):
            raise FileNotFoundError(f"{setting} {data_dir} has no ALFWorld games ({expected}, as alfworld-download "
                                    f"writes); found {_listing(root)}")
        self.index, skipped, total = self._scan()
        if not self.index:
            found = (f"0 of {total} games are playable: {_counts(skipped)}" if total else
                     f"no {GAME_FILE} in {', '.join(d + '/' for d in ALFWORLD_SPLITS.values())} two folders down")
            raise ValueError(f"{setting} {data_dir}: {found} ({expected})")
        if skipped:
            # ALFWorld's own loader skips movable, sliced and unsolvable games too: a count, not a warning.
            log.info("%s %s: skipped %d of %d games: %s", setting, data_dir, sum(skipped.values()), total,
                     _counts(skipped))

    def _scan(self) -> tuple[dict[tuple[str, str], list[Path]], dict[str, int], int]:
        """(split, task type) -> game folders, sorted; skipping what ALFWorld skips (movable, sliced, unsolvable)."""
        out: dict[tuple[str, str], list[Path]] = {}
        skipped: dict[str, int] = {}
        total = 0
        for split, folder in ALFWORLD_SPLITS.items():
            for game in sorted((self.root / folder).glob(f"*/*/{GAME_FILE}")):
                total += 1
                task_dir = game.parent.parent.name
                task_type = task_dir.split("-")[0]
                if task_type not in TASK_TYPES:
                    reason = "of an unknown task type"
                elif "movable" in task_dir or "Sliced" in task_dir:
                    reason = "movable or sliced"
                else:
                    solvable = _solvable(game)
                    if solvable:
                        out.setdefault((split, task_type), []).append(game.parent)
                        continue
                    reason = "marked unsolvable" if solvable is False else f"with an unreadable {GAME_FILE}"
                skipped[reason] = skipped.get(reason, 0) + 1
        return out, skipped, total

    def counts(self) -> str:
        """Playable games per ALFWorld split folder: 'train 6, valid_seen 0, valid_unseen 2'."""
        return ", ".join(f"{folder} {sum(len(v) for (s, _), v in self.index.items() if s == split)}"
                         for split, folder in ALFWORLD_SPLITS.items())

    def tasks(self, split: str, n: int, types: Sequence[str], start: int) -> list[Task]:
        per_type = {t: len(self.index.get((split, t), [])) for t in types}
        if n and not any(per_type.values()):
            raise ValueError(f"{self.setting} {self.root}: no playable {split} games ({ALFWORLD_SPLITS[split]}/) of "
                             f"types {', '.join(types)}; playable games per folder: {self.counts()}")
        return [Task("alfworld", t, s, split) for t, s in _interleave(per_type, types, n, start)]

    def game_dir(self, task: Task) -> Path:
        games = self.index.get((task.split, task.task_type), [])
        if not 0 <= task.seed < len(games):
            raise KeyError(f"{task.id}: {self.root} has {len(games)} {task.task_type} games in {task.split}")
        return games[task.seed]

    def prepare(self, tasks: Sequence[Task], workers: int = 2) -> int:
        return 0


def _counts(reasons: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda x: -x[1]))


def export_dataset(tasks: Sequence[Task], out_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Write generated games in ALFWorld's data layout (what `alfworld-download` produces); returns `out_dir`."""
    store = GeneratedGames(cache_dir)
    root = Path(out_dir) / "json_2.1.1"
    for task in tasks:
        src = store.game_dir(task)
        goal = read_goal(src)
        scene = json.loads((src / TRAJ_FILE).read_text())["scene"]["scene_num"]
        name = f"{goal.task_type}-{goal.object_target}-None-{goal.parent_target or goal.toggle_target}-{scene}"
        dst = root / ALFWORLD_SPLITS[task.split] / name / f"trial_sadray_{task.seed:06d}"
        dst.mkdir(parents=True, exist_ok=True)
        for f in (TRAJ_FILE, GAME_FILE):
            shutil.copyfile(src / f, dst / f)
    return Path(out_dir)
