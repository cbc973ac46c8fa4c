"""ALFWorld's own text engine (TextWorld's `PddlEnv` under `AlfredDemangler`), with its repeated work cached.

Three costs dominate an unmodified episode in a full kitchen: PDDL->SAS translation runs four times per game
(twice in `load`, twice again in `reset`; one of each pair only feeds the planner), and every step re-parses each
admissible command's template with TatSu. While this engine runs, translations are memoised per game (and the
planner's optimised one is skipped unless the planner is wanted) and template parses per string. Both are pure
functions of their inputs, so observations, admissible commands and outcomes are unchanged.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import Any

import fast_downward
import textworld
import textworld.envs.pddl.textgen as textgen
import textworld.logic as twlogic
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
from textworld.envs import PddlEnv

BANNER = "-= Welcome to TextWorld, ALFRED! =-"

_original_pddl2sas = fast_downward.pddl2sas


def _memoised(parse: Any) -> Any:
    """A TatSu parse function with its results cached per (text, rule); callers get copies, since derive()
    mutates the symbols it is given."""
    parsed = cache(lambda text, rule_name: parse(text, rule_name=rule_name))

    def cached(*args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or set(kwargs) - {"rule_name", "trace"} or kwargs.get("trace") or "rule_name" not in kwargs:
            return parse(*args, **kwargs)
        return copy.deepcopy(parsed(args[0], kwargs["rule_name"]))

    return cached


# (module, original, memoised): the grammar's template parser and the logic's query parser.
_PARSERS = [(module, module._parse_and_convert, _memoised(module._parse_and_convert)) for module in (textgen, twlogic)]


class Engine:
    """One ALFWorld game at a time: load a `game.tw-pddl` (path or dict), reset, step.

    The caches are swapped into textworld/fast_downward only for the duration of each call, so other users of
    those libraries in the process are unaffected; engines are meant for one thread each (Ray actors, workers).
    """

    def __init__(self, planner: bool = False) -> None:
        self.planner = planner
        infos = textworld.EnvInfos(admissible_commands=True, won=True, policy_commands=planner)
        self._env = AlfredDemangler()(PddlEnv(infos))
        self._translations: dict[tuple[str, str, bool], Any] = {}

    def _pddl2sas(self, domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        # Only the planner reads the optimised translation; the game itself runs on the plain one.
        optimize = optimize and self.planner
        key = (domain, problem, optimize)
        if key not in self._translations:
            argv = sys.argv  # fast_downward rebinds sys.argv for its option parser
            try:
                self._translations[key] = _original_pddl2sas(domain, problem, verbose=verbose, optimize=optimize)
            finally:
                sys.argv = argv
        return self._translations[key]

    @contextmanager
    def _speedups(self) -> Iterator[None]:
        fast_downward.pddl2sas = self._pddl2sas
        for module, _, memoised in _PARSERS:
            module._parse_and_convert = memoised
        try:
            yield
        finally:
            fast_downward.pddl2sas = _original_pddl2sas
            for module, original, _ in _PARSERS:
                module._parse_and_convert = original

    def load(self, game: str | Mapping[str, Any]) -> None:
        self._translations.clear()
        with self._speedups():
            self._env.load(game if isinstance(game, str) else dict(game))

    def reset(self) -> textworld.GameState:
        with self._speedups():
            return self._env.reset()

    def step(self, command: str) -> tuple[textworld.GameState, float, bool]:
        with self._speedups():
            return self._env.step(command)
