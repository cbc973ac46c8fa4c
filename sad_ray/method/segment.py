"""Rule-based segmentation of one assistant turn into [REASON] and [ACT] character spans (SAD's span split).

Each format is a rule that finds the labelled blocks of a turn; one shared assembler then gives whitespace and
unmatched text to spans, so every format obeys the same partition contract and counts problems the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Literal

SpanKind = Literal["reason", "act"]
# A block's kind: "obs" is an environment observation the model wrote itself (supervised by neither mask);
# "unmatched" is text no rule matched (rules never produce it, the assembler does).
BlockKind = Literal["reason", "act", "obs", "unmatched"]
OnUnparsed = Literal["reason", "drop"]


@dataclass(frozen=True)
class Span:
    """Half-open character range [start, end) of a turn's text and the loss it is supervised by."""

    start: int
    end: int
    kind: SpanKind

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"span must be non-empty with 0 <= start < end, got [{self.start}, {self.end})")
        if self.kind not in ("reason", "act"):
            raise ValueError(f"span kind must be 'reason' or 'act', got {self.kind!r}")


@dataclass(frozen=True)
class Segmentation:
    """Sorted, disjoint, non-empty spans of one turn, and how often each problem was seen in it.

    Issue reasons: `empty_turn` (blank text), `unmatched_text` (one count per run of text no rule matched),
    `no_action` (non-empty turn without an action, see `segment`), `observation_in_turn` (the model wrote an
    observation block), `unclosed_bracket` (webshop command without its closing `]`).
    """

    spans: tuple[Span, ...]
    issues: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class _Block:
    # The "core" of a labelled block: from its label to its last non-whitespace character.
    start: int
    end: int
    kind: BlockKind


_Rule = Callable[[str, Counter], list[_Block]]

_NUM = r"(?:[ \t]*\d+)?[ \t]*:"  # optional step number ("Thought 1:") then the colon
_OBS_LABEL = rf"observation{_NUM}"


def _with_next(items: list[re.Match[str]]) -> Iterator[tuple[re.Match[str], re.Match[str] | None]]:
    """Each match with the one after it (None for the last): a block runs until the next one starts."""
    return zip_longest(items, items[1:])


def _trim_end(text: str, start: int, end: int) -> int:
    """End of `text[start:end]` without its trailing whitespace."""
    return start + len(text[start:end].rstrip())


def _label_rule(labels: dict[str, BlockKind]) -> _Rule:
    """A rule for `Label:` formats: a block runs from its label (at a line start) to the next label."""
    names = "|".join(sorted(map(re.escape, labels), key=len, reverse=True))  # "action input" before "action"
    pattern = re.compile(rf"^[ \t]*(?P<label>(?P<name>{names}){_NUM})", re.IGNORECASE | re.MULTILINE)

    def rule(text: str, issues: Counter) -> list[_Block]:
        matches = list(pattern.finditer(text))
        blocks = []
        for m, nxt in _with_next(matches):
            stop = nxt.start() if nxt else len(text)
            kind = labels[m["name"].lower()]
            blocks.append(_Block(m.start("label"), _trim_end(text, m.start("label"), stop), kind))
        return blocks

    return rule


_react = _label_rule(
    {
        "thought": "reason",
        "action": "act",
        "action input": "act",  # LangChain-style ReAct writes the tool arguments on their own line
        "final answer": "act",
        "observation": "obs",
    }
)
_paper = _label_rule({"reasoning": "reason", "action": "act", "answer": "act", "observation": "obs"})

# WebShop's commands, optionally after ALFWorld-style "> " or the ReAct prompts' "Action: " wrapper.
_WEBSHOP_CMD = rf"(?:>[ \t]*)?(?:(?i:action){_NUM}[ \t]*)?(?P<verb>think|search|click)\["
_WEBSHOP_LABEL = re.compile(rf"^[ \t]*(?P<label>{_WEBSHOP_CMD}|(?i:{_OBS_LABEL}))", re.MULTILINE)


def _closing_bracket(text: str, open_at: int, stop: int) -> int | None:
    """Index of the `]` closing the `[` at `open_at` (nesting allowed), searching before `stop`."""
    depth = 0
    for i in range(open_at, stop):
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def _webshop(text: str, issues: Counter) -> list[_Block]:
    matches = list(_WEBSHOP_LABEL.finditer(text))
    blocks = []
    for m, nxt in _with_next(matches):
        stop = nxt.start() if nxt else len(text)
        start = m.start("label")
        if m["verb"] is None:
            blocks.append(_Block(start, _trim_end(text, start, stop), "obs"))
            continue
        close = _closing_bracket(text, m.end() - 1, stop)
        if close is None:
            issues["unclosed_bracket"] += 1
            end = _trim_end(text, start, stop)
        else:
            end = close + 1  # text after the `]` and before the next label is left unmatched
        blocks.append(_Block(start, end, "reason" if m["verb"] == "think" else "act"))
    return blocks


_ALF_THINK = re.compile(r">?[ \t]*think[ \t]*:", re.IGNORECASE)
_ALF_PROMPTED = re.compile(r">[ \t]*\S")
# ALFWorld's command verbs, case-sensitive: the game writes them lower-case, prose lines start capitalised.
_ALF_VERB = re.compile(
    r"(?:go to|take|put|open|close|toggle|heat|cool|clean|slice|use|examine|look|inventory)\b"
)
_ALF_OBS = re.compile(_OBS_LABEL, re.IGNORECASE)


def _alfworld(text: str, issues: Counter) -> list[_Block]:
    """Line-based: a command is one line; thoughts and observations continue over unlabelled lines."""
    blocks: list[_Block] = []
    open_kind: BlockKind | None = None  # the block an unlabelled line continues, if any
    offset = 0
    for line in text.splitlines(keepends=True):
        body = line.strip()
        start = offset + len(line) - len(line.lstrip())
        offset += len(line)
        if not body:
            continue
        end = start + len(body)
        if _ALF_THINK.match(body):
            kind: BlockKind | None = "reason"
        elif _ALF_OBS.match(body):
            kind = "obs"
        elif _ALF_PROMPTED.match(body) or _ALF_VERB.match(body):
            kind = "act"
        elif open_kind is not None:
            blocks[-1] = _Block(blocks[-1].start, end, open_kind)
            continue
        else:
            continue  # left as a gap: the assembler counts it as unmatched
        blocks.append(_Block(start, end, kind))
        open_kind = None if kind == "act" else kind
    return blocks


# A closed or unclosed `<think>` block, or a turn that opens inside the thought (no `<think>` before `</think>`).
_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|\Z)|\A(?:(?!<think>).)*?</think>", re.DOTALL)


def _think_tag(text: str, issues: Counter) -> list[_Block]:
    """`<think>…</think>` is reason, the text after it is act; a turn may start inside the thought because
    templates such as Qwen3's and DeepSeek-R1's put the opening `<think>` in the generation prompt."""
    blocks = []
    thoughts = list(_THINK_BLOCK.finditer(text))
    for m, nxt in _with_next(thoughts):
        blocks.append(_Block(m.start(), m.end(), "reason"))
        stop = nxt.start() if nxt else len(text)
        rest = text[m.end() : stop]
        if rest.strip():
            start = m.end() + len(rest) - len(rest.lstrip())
            blocks.append(_Block(start, _trim_end(text, start, stop), "act"))
    return blocks


FORMATS: dict[str, _Rule] = {
    "react": _react,
    "alfworld": _alfworld,
    "webshop": _webshop,
    "paper": _paper,
    "think_tag": _think_tag,
}

# ALFWorld and WebShop ReAct agents think in a turn of their own (the environment answers "OK."), so a
# thought-only turn is not a problem there.
_THOUGHT_ONLY_TURNS = frozenset({"alfworld", "webshop"})

# `auto` takes the first format whose marker appears. Specific markers come first; the bare `Action:` label is
# shared by react, paper and WebShop's wrapper, so it only decides after those had their chance.
_AUTO_ORDER: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("think_tag", re.compile(r"</?think>")),
    ("paper", re.compile(rf"^[ \t]*(?:reasoning|answer){_NUM}", re.IGNORECASE | re.MULTILINE)),
    ("react", re.compile(rf"^[ \t]*thought{_NUM}", re.IGNORECASE | re.MULTILINE)),
    ("webshop", re.compile(rf"^[ \t]*{_WEBSHOP_CMD}", re.MULTILINE)),
    ("react", re.compile(rf"^[ \t]*(?:action|final answer){_NUM}", re.IGNORECASE | re.MULTILINE)),
    ("alfworld", re.compile(rf"^[ \t]*(?:>|(?i:think)[ \t]*:|{_ALF_VERB.pattern})", re.MULTILINE)),
)
_AUTO_DEFAULT = "react"


def detect_format(text: str) -> str:
    """The format `auto` uses for `text`: think_tag (`<think>`), paper (`Reasoning:`/`Answer:`), react
    (`Thought:`), webshop (`think[`/`search[`/`click[`), react (`Action:`), alfworld (`think:`, `> cmd`, or a
    command verb); react if none appears (then all text is unmatched)."""
    return next((name for name, marker in _AUTO_ORDER if marker.search(text)), _AUTO_DEFAULT)


def _assemble(text: str, blocks: list[_Block], on_unparsed: OnUnparsed, issues: Counter) -> list[Span]:
    """Turn block cores into spans: non-blank gaps become unmatched blocks, whitespace between blocks joins
    the preceding block and leading whitespace the first; observations and dropped text become no span."""
    cores: list[_Block] = []
    pos = 0
    for block in [*blocks, None]:
        gap_end = block.start if block else len(text)
        gap = text[pos:gap_end]
        if gap.strip():
            start = pos + len(gap) - len(gap.lstrip())
            cores.append(_Block(start, _trim_end(text, start, gap_end), "unmatched"))
            issues["unmatched_text"] += 1
        if block:
            cores.append(block)
            pos = block.end

    supervised = {
        "reason": "reason",
        "act": "act",
        "unmatched": "reason" if on_unparsed == "reason" else None,
    }
    spans: list[Span] = []
    for i, core in enumerate(cores):
        start = 0 if i == 0 else core.start
        end = len(text) if i == len(cores) - 1 else cores[i + 1].start
        kind = supervised.get(core.kind)
        if kind is None:
            continue
        if spans and spans[-1].kind == kind and spans[-1].end == start:
            spans[-1] = Span(
                spans[-1].start, end, kind
            )  # e.g. unmatched text kept as reason before a thought
        else:
            spans.append(Span(start, end, kind))
    return spans


def segment(text: str, fmt: str, on_unparsed: OnUnparsed = "reason") -> Segmentation:
    """Split one assistant turn's `text` into reason/act spans by the rule of format `fmt` (or `"auto"`).

    Every character belongs to exactly one span, except observation blocks and, with `on_unparsed="drop"`,
    text no rule matched (with `"reason"` that text is a reason span). Label words belong to their span;
    whitespace between blocks goes to the preceding span, leading whitespace to the following one. Problems
    are counted in `issues`, never raised; `no_action` means a non-empty turn has no action (for alfworld and
    webshop only when it holds no thought either, since thought-only turns are normal there).
    """
    if fmt == "auto":
        fmt = detect_format(text)
    if fmt not in FORMATS:
        raise ValueError(f"unknown segmentation format {fmt!r}; known: {', '.join([*FORMATS, 'auto'])}")
    if on_unparsed not in ("reason", "drop"):
        raise ValueError(f"on_unparsed must be 'reason' or 'drop', got {on_unparsed!r}")
    issues: Counter[str] = Counter()
    if not text.strip():
        issues["empty_turn"] += 1
        return Segmentation((), issues)

    blocks = FORMATS[fmt](text, issues)
    kinds = {b.kind for b in blocks}
    if "obs" in kinds:
        issues["observation_in_turn"] += sum(b.kind == "obs" for b in blocks)
    if "act" not in kinds and (fmt not in _THOUGHT_ONLY_TURNS or "reason" not in kinds):
        issues["no_action"] += 1
    spans = _assemble(text, blocks, on_unparsed, issues)
    return Segmentation(tuple(spans), issues)
