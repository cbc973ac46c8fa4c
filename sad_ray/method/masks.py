"""Render a chat with the tokenizer's template and build its `input_ids`, `reason_mask` and `act_mask`.

Spans come from `segment` per assistant turn; a token joins the span kind covering most of its characters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np

from sad_ray.method.segment import OnUnparsed, Span, segment

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tie-break when two kinds cover equally many characters of a token: act > reason > none. A token that
# straddles a boundary is one the student must emit to finish that span, and the action is the part that
# must come out whole; so ties go to supervision, and to the action over the thought.
_NONE, _REASON, _ACT = 0, 1, 2
_TIE_ORDER = (_ACT, _REASON, _NONE)


def char_spans_to_token_masks(
    offsets: Sequence[tuple[int, int]], spans: Sequence[Span]
) -> tuple[np.ndarray, np.ndarray]:
    """Token masks (reason_mask, act_mask), bool [T], from per-token character `offsets` and character `spans`.

    Each token takes the kind covering most of its characters; characters in no span count as "none" and a
    token whose majority is "none" is in neither mask; ties go act > reason > none; zero-width tokens
    (offsets (s, s), e.g. special tokens added by a post-processor) are in neither.
    """
    ordered = sorted(spans, key=lambda s: s.start)
    for a, b in pairwise(ordered):
        if b.start < a.end:
            raise ValueError(f"spans overlap: {a} and {b}")
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [T, 2]
    n_chars = int(max(off.max(initial=0), max((s.end for s in ordered), default=0)))
    label = np.zeros(n_chars, dtype=np.int8)  # [C] kind of each character
    for s in ordered:
        label[s.start : s.end] = _ACT if s.kind == "act" else _REASON

    # counts[k, t] = characters of token t with kind k, via prefix sums over the character labels.
    prefix = np.zeros((3, n_chars + 1), dtype=np.int64)
    for k in (_NONE, _REASON, _ACT):
        prefix[k, 1:] = np.cumsum(label == k)
    starts, ends = off[:, 0], off[:, 1]
    counts = prefix[:, ends] - prefix[:, starts]  # [3, T]

    # argmax over kinds listed in tie order picks the first, i.e. the preferred, of equal maxima.
    winner = np.asarray(_TIE_ORDER)[np.argmax(counts[list(_TIE_ORDER)], axis=0)]  # [T]
    winner[ends <= starts] = _NONE
    return winner == _REASON, winner == _ACT


@dataclass(frozen=True)
class MaskResult:
    """One trajectory as tokens with its SAD masks; `issues` sums the segmentation issues over its turns."""

    input_ids: np.ndarray  # int32 [T]
    reason_mask: np.ndarray  # bool [T]
    act_mask: np.ndarray  # bool [T]
    text: str  # the rendered chat that `input_ids` tokenizes
    issues: Counter[str]
    reasoning_length: int  # number of reason tokens
    action_length: int  # number of act tokens


def validate_turns(turns: Any) -> None:
    """Raise a ValueError naming the first turn (and key) that is not `{"role": str, "content": str, ...}`."""
    if not isinstance(turns, (list, tuple)):
        raise ValueError(f"turns must be a list of dicts, got {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(
                f"turns[{i}] must be a dict with 'role' and 'content', got {type(turn).__name__}"
            )
        for key in ("role", "content"):
            if key not in turn:
                raise ValueError(f"turns[{i}] has no {key!r} key")
            if not isinstance(turn[key], str):
                raise ValueError(f"turns[{i}][{key!r}] must be a str, got {type(turn[key]).__name__}")


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """All special-token strings, longest first so that a prefix never shadows a longer marker."""
    names = set(getattr(tokenizer, "all_special_tokens", []))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names.update(tok.content for tok in decoder.values() if getattr(tok, "special", False))
    return sorted((n for n in names if n), key=len, reverse=True)


def end_of_turn_marker(
    text: str, content_end: int, eos_token: str | None, specials: Sequence[str]
) -> int | None:
    """End of the end-of-turn marker the template wrote after an assistant content ending at `content_end`.

    The marker is the eos token or another special token that follows the content on the same line, after
    nothing but spaces or tabs (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`, Llama-2 ` </s>`); None if absent.
    """
    line_end = text.find("\n", content_end)
    window = text[content_end : len(text) if line_end < 0 else line_end]
    at = content_end + len(window) - len(window.lstrip(" \t"))
    for token in ([eos_token] if eos_token else []) + list(specials):
        if text.startswith(token, at):
            return at + len(token)
    return None


def _locate(text: str, content: str, pos: int) -> tuple[int, str] | None:
    """First (start, rendered content) at or after `pos`; also tries the stripped content, since many
    templates `trim` messages (segmenting what was rendered keeps offsets exact)."""
    for candidate in dict.fromkeys([content, content.strip()]):
        at = text.find(candidate, pos)
        if candidate and at >= 0:
            return at, candidate
    return None


def _require_fast(tokenizer: PreTrainedTokenizerBase) -> None:
    # Only fast (Rust) tokenizers report character offsets, which the span -> token mapping needs.
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"build_masks needs a fast tokenizer (offset mapping); got {type(tokenizer).__name__}, "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def build_masks(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[dict[str, str]],
    fmt: str,
    on_unparsed: OnUnparsed = "reason",
    supervise_end_of_turn: bool = True,
    supervised_turns: Collection[int] | None = None,
) -> MaskResult:
    """Render `turns` with the chat template (no generation prompt), segment each assistant content with
    `segment(content, fmt, on_unparsed)` and map the spans to tokens of the rendered text.

    With `supervise_end_of_turn`, the end-of-turn marker after each assistant content (see
    `end_of_turn_marker`) joins that turn's last span, so the student learns to stop; the marker is in the
    rendered text, so the fast tokenizer gives its token real offsets and the majority rule maps it like any
    other. Non-assistant turns are in neither mask, nor is position 0 (nothing predicts it).
    `supervised_turns` (indices into `turns`) limits supervision to those assistant turns; the others are
    context, as in a window that opens with earlier steps (`sad_ray.envs.react.episode_windows`).
    """
    validate_turns(turns)
    _require_fast(tokenizer)
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    specials = _special_tokens(tokenizer)
    eos = getattr(tokenizer, "eos_token", None)

    spans: list[Span] = []
    issues: Counter[str] = Counter()
    pos = 0
    for i, turn in enumerate(turns):
        found = _locate(text, turn["content"], pos)
        if turn["role"] != "assistant":
            # Advancing past other turns keeps an assistant match from landing in an earlier prompt that
            # quotes it; a system or tool text the template rewrote is simply not found and skipped.
            if found:
                pos = found[0] + len(found[1])
            continue
        if found is None and turn["content"].strip():
            raise ValueError(
                f"turns[{i}] (assistant): its content is not in the rendered chat after position {pos}; "
                "the chat template must have changed it (e.g. removed a <think> block)"
            )
        start, content = found if found else (pos, "")
        if supervised_turns is not None and i not in supervised_turns:
            pos = start + len(content)
            continue
        seg = segment(content, fmt, on_unparsed)
        issues.update(seg.issues)
        turn_spans = [Span(s.start + start, s.end + start, s.kind) for s in seg.spans]
        end = start + len(content)
        marker_end = end_of_turn_marker(text, end, eos, specials) if supervise_end_of_turn else None
        if turn_spans and marker_end is not None:
            last = turn_spans[-1]
            if last.end == end:
                turn_spans[-1] = Span(last.start, marker_end, last.kind)
            else:  # the turn ends in an observation or dropped text: supervise only the marker itself
                turn_spans.append(Span(end, marker_end, last.kind))
        spans.extend(turn_spans)
        pos = end

    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    reason_mask, act_mask = char_spans_to_token_masks(enc["offset_mapping"], spans)
    reason_mask[:1] = act_mask[:1] = False
    return MaskResult(
        input_ids=np.asarray(enc["input_ids"], dtype=np.int32),
        reason_mask=reason_mask,
        act_mask=act_mask,
        text=text,
        issues=issues,
        reasoning_length=int(reason_mask.sum()),
        action_length=int(act_mask.sum()),
    )
