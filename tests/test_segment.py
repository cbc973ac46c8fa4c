"""Rule-based [REASON]/[ACT] segmentation of single assistant turns, per format."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sad_ray.method.segment import FORMATS, Segmentation, Span, detect_format, segment


def pieces(text: str, seg: Segmentation) -> list[tuple[str, str]]:
    return [(s.kind, text[s.start : s.end]) for s in seg.spans]


# ---- react ---------------------------------------------------------------------------------------------


def test_react_alfworld_turn_exact_spans():
    text = (
        "Thought: I need to find a mug. A mug is more likely in a cabinet or on a countertop.\n"
        "Action: go to countertop 1"
    )
    seg = segment(text, "react")
    split = text.index("Action:")
    assert seg.spans == (Span(0, split, "reason"), Span(split, len(text), "act"))
    assert not seg.issues


def test_react_numbered_hotpotqa_with_observation_excluded():
    text = (
        "Thought 1: I need to search Colorado orogeny, find the area that the eastern sector extends into.\n"
        "Action 1: Search[Colorado orogeny]\n"
        "Observation 1: The Colorado orogeny was an episode of mountain building in Colorado.\n"
        "Thought 2: It does not mention the eastern sector. So I need to look up eastern sector.\n"
        "Action 2: Lookup[eastern sector]\n"
    )
    seg = segment(text, "react")
    assert pieces(text, seg) == [
        (
            "reason",
            "Thought 1: I need to search Colorado orogeny, find the area that the eastern sector extends into.\n",
        ),
        ("act", "Action 1: Search[Colorado orogeny]\n"),
        (
            "reason",
            "Thought 2: It does not mention the eastern sector. So I need to look up eastern sector.\n",
        ),
        ("act", "Action 2: Lookup[eastern sector]\n"),
    ]
    # The observation the model wrote is in no span, and it is reported.
    obs = text.index("Observation 1:")
    assert seg.spans[1].end == obs and seg.spans[2].start == text.index("Thought 2:")
    assert seg.issues == {"observation_in_turn": 1}


def test_react_whitespace_rules():
    text = "  \nThought: a\n\n  Action: b  \n"
    seg = segment(text, "react")
    # Leading whitespace goes to the first span, whitespace between blocks to the preceding one.
    assert pieces(text, seg) == [("reason", "  \nThought: a\n\n  "), ("act", "Action: b  \n")]


def test_react_labels_only_at_line_start_and_case_insensitive():
    text = "thought: the word Action: inside a thought is not a label\nACTION: open drawer 1"
    assert pieces(text, segment(text, "react")) == [
        ("reason", "thought: the word Action: inside a thought is not a label\n"),
        ("act", "ACTION: open drawer 1"),
    ]


# ---- alfworld ------------------------------------------------------------------------------------------


def test_alfworld_think_and_commands():
    text = (
        "> think: To solve the task, I need to find and take a mug, then put it in coffeemachine.\n"
        "First I need to find a mug.\n"
        "> go to countertop 1\n"
    )
    seg = segment(text, "alfworld")
    assert pieces(text, seg) == [
        (
            "reason",
            "> think: To solve the task, I need to find and take a mug, then put it in coffeemachine.\n"
            "First I need to find a mug.\n",
        ),
        ("act", "> go to countertop 1\n"),
    ]
    assert not seg.issues


@pytest.mark.parametrize(
    "text", ["take mug 1 from countertop 1", "put mug 1 in/on coffeemachine 1", "> inventory"]
)
def test_alfworld_bare_command_is_one_act_span(text):
    seg = segment(text, "alfworld")
    assert seg.spans == (Span(0, len(text), "act"),) and not seg.issues


def test_alfworld_thought_only_turn_is_normal():
    # ReAct-ALFWorld thinks in a turn of its own and the game answers "OK.".
    seg = segment("think: Now I find a mug (1). Next, I need to take it.", "alfworld")
    assert [s.kind for s in seg.spans] == ["reason"] and not seg.issues


def test_alfworld_text_after_a_command_is_unmatched():
    text = "go to cabinet 1\nYou arrive at cabinet 1. The cabinet 1 is closed."
    seg = segment(text, "alfworld", on_unparsed="drop")
    assert pieces(text, seg) == [("act", "go to cabinet 1\n")]
    assert seg.issues == {"unmatched_text": 1}


# ---- webshop -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("think[B078GWRC1J and B078GTKVXY are bright citrus deodorant less then 50 dollars.]", "reason"),
        ("Action: think[I can check B078GWRC1J first.]\n", "reason"),
        ("search[3 ounce bright citrus deodorant sensitive skin]", "act"),
        ("Action: click[B078GWRC1J]", "act"),
        ("click[Buy Now]", "act"),
    ],
)
def test_webshop_single_command(text, kind):
    seg = segment(text, "webshop")
    assert seg.spans == (Span(0, len(text), kind),)
    assert not seg.issues  # a think-only turn is WebShop-ReAct's convention (answered by "OK.")


def test_webshop_think_then_click_with_nested_brackets():
    text = "think[The [3 ounce] option is cheaper.]\nclick[3 ounce (pack of 1)]"
    assert pieces(text, segment(text, "webshop")) == [
        ("reason", "think[The [3 ounce] option is cheaper.]\n"),
        ("act", "click[3 ounce (pack of 1)]"),
    ]


def test_webshop_malformed():
    seg = segment("search[citrus deodorant", "webshop")
    assert seg.spans == (Span(0, 23, "act"),) and seg.issues == {"unclosed_bracket": 1}
    text = "click[Buy Now] and then I am done"
    seg = segment(text, "webshop")
    assert pieces(text, seg) == [("act", "click[Buy Now] "), ("reason", "and then I am done")]
    assert seg.issues == {"unmatched_text": 1}


# ---- paper and think_tag -------------------------------------------------------------------------------


def test_paper_format():
    text = "Reasoning: The mug is on the counter, so I should take it.\nAction: take mug 1\n"
    assert pieces(text, segment(text, "paper")) == [
        ("reason", "Reasoning: The mug is on the counter, so I should take it.\n"),
        ("act", "Action: take mug 1\n"),
    ]
    text = "Reasoning: 3 + 4 = 7.\nAnswer: 7"
    seg = segment(text, "paper")
    assert pieces(text, seg) == [("reason", "Reasoning: 3 + 4 = 7.\n"), ("act", "Answer: 7")]


def test_think_tag_then_tool_call():
    text = '<think>\nI should look the city up.\n</think>\n\n<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call>'
    split = text.index("<tool_call>")
    seg = segment(text, "think_tag")
    assert seg.spans == (Span(0, split, "reason"), Span(split, len(text), "act"))
    assert not seg.issues


def test_think_tag_turn_opening_inside_the_thought():
    # Qwen3/DeepSeek-R1 templates put "<think>" in the generation prompt, so the content starts mid-thought.
    text = "I should answer directly.\n</think>\n\nThe answer is 42."
    assert pieces(text, segment(text, "think_tag")) == [
        ("reason", "I should answer directly.\n</think>\n\n"),
        ("act", "The answer is 42."),
    ]


def test_think_tag_unclosed_has_no_action():
    seg = segment("<think>still thinking", "think_tag")
    assert seg.spans == (Span(0, 21, "reason"),) and seg.issues == {"no_action": 1}


# ---- auto ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("<think>x</think><tool_call>{}</tool_call>", "think_tag"),
        ("Reasoning: r\nAction: a", "paper"),
        ("Answer: 7", "paper"),
        ("Thought 1: t\nAction 1: Search[x]", "react"),
        ("Thought: t\nAction: search[x]", "react"),
        ("Action: think[t]", "webshop"),
        ("click[Buy Now]", "webshop"),
        ("Action: go to countertop 1", "react"),
        ("> think: t", "alfworld"),
        ("go to countertop 1", "alfworld"),
        ("no markers at all", "react"),
    ],
)
def test_detect_format_order(text, fmt):
    assert detect_format(text) == fmt
    assert segment(text, "auto") == segment(text, fmt)


# ---- issues, modes, errors -----------------------------------------------------------------------------


def test_no_action_is_counted():
    seg = segment("Thought: I am not sure what to do next.", "react")
    assert seg.spans == (Span(0, 39, "reason"),) and seg.issues == {"no_action": 1}


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_turn(text):
    seg = segment(text, "react")
    assert seg.spans == () and seg.issues == {"empty_turn": 1}


def test_unmatched_text_reason_vs_drop():
    text = "Sure, let me help.\nThought: the mug is in the sink.\nAction: go to sinkbasin 1"
    thought, action = text.index("Thought"), text.index("Action")
    kept = segment(text, "react", on_unparsed="reason")
    # The free text joins the following thought as one reason span.
    assert kept.spans == (Span(0, action, "reason"), Span(action, len(text), "act"))
    dropped = segment(text, "react", on_unparsed="drop")
    assert dropped.spans == (Span(thought, action, "reason"), Span(action, len(text), "act"))
    assert kept.issues == dropped.issues == {"unmatched_text": 1}


def test_plain_text_turn_without_labels():
    seg = segment("I will now go to the countertop.", "react", on_unparsed="drop")
    assert seg.spans == () and seg.issues == {"unmatched_text": 1, "no_action": 1}


def test_unknown_format_lists_known_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown segmentation format 'hotpot'.*react.*alfworld.*webshop.*paper.*think_tag.*auto",
    ):
        segment("Thought: x", "hotpot")
    with pytest.raises(ValueError, match="on_unparsed"):
        segment("Thought: x", "react", on_unparsed="keep")  # type: ignore[arg-type]


@pytest.mark.parametrize(("start", "end", "kind"), [(3, 3, "act"), (-1, 2, "act"), (0, 2, "observation")])
def test_span_rejects_invalid(start, end, kind):
    with pytest.raises(ValueError):
        Span(start, end, kind)


# ---- properties ----------------------------------------------------------------------------------------

_words = st.text(alphabet="abcdefg XYZ019.,:[]<>/\n\t", max_size=25)
_blocks = st.one_of(
    _words.map(lambda w: f"Thought: {w}"),
    _words.map(lambda w: f"Thought 2: {w}"),
    _words.map(lambda w: f"Action 3: Search[{w}]"),
    _words.map(lambda w: f"Action: {w}"),
    _words.map(lambda w: f"Observation: {w}"),
    _words.map(lambda w: f"Reasoning: {w}"),
    _words.map(lambda w: f"Answer: {w}"),
    _words.map(lambda w: f"> think: {w}"),
    _words.map(lambda w: f"think: {w}"),
    _words.map(lambda w: f"> {w}"),
    _words.map(lambda w: f"go to {w}"),
    _words.map(lambda w: f"think[{w}]"),
    _words.map(lambda w: f"search[{w}"),
    _words.map(lambda w: f"Action: click[{w}]"),
    _words.map(lambda w: f"<think>{w}</think>"),
    _words.map(lambda w: f"<think>{w}"),
    _words.map(lambda w: f"{w}</think>"),
    _words.map(lambda w: f"<tool_call>{w}</tool_call>"),
    _words,
)
_turns = st.lists(st.tuples(_blocks, st.sampled_from(["", "\n", " ", "\n\n", "  \n"])), max_size=8).map(
    lambda parts: "".join(b + sep for b, sep in parts)
)


@settings(max_examples=300, deadline=None)
@given(text=_turns, fmt=st.sampled_from([*FORMATS, "auto"]))
def test_spans_are_a_sorted_disjoint_partition(text, fmt):
    kept = segment(text, fmt, on_unparsed="reason")
    dropped = segment(text, fmt, on_unparsed="drop")
    for seg in (kept, dropped):
        assert all(0 <= s.start < s.end <= len(text) for s in seg.spans)
        assert all(a.end <= b.start for a, b in pairwise(seg.spans))
        assert all(n > 0 for n in seg.issues.values())
    assert kept.issues == dropped.issues
    # Dropping unmatched text only removes reason characters; the actions are the same either way.
    assert [s for s in kept.spans if s.kind == "act"] == [s for s in dropped.spans if s.kind == "act"]
    covered = lambda seg: {i for s in seg.spans for i in range(s.start, s.end)}  # noqa: E731
    assert covered(dropped) <= covered(kept)
    if not text.strip():
        assert kept.spans == () and kept.issues == {"empty_turn": 1}
    elif "observation_in_turn" not in kept.issues:
        # With nothing to exclude, every character of the turn is in exactly one span.
        assert covered(kept) == set(range(len(text)))
    if "unmatched_text" not in kept.issues:
        assert kept.spans == dropped.spans


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.text("abc xyz.", min_size=1).filter(str.strip),
            st.text("abc xyz[]", min_size=1).filter(str.strip),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_well_formed_react_alternates_without_issues(steps):
    text = "".join(f"Thought {i}: {t}\nAction {i}: {a}\n" for i, (t, a) in enumerate(steps, 1))
    seg = segment(text, "react")
    assert not seg.issues
    assert [s.kind for s in seg.spans] == ["reason", "act"] * len(steps)
    assert [text[s.start : s.end] for s in seg.spans[1::2]] == [
        f"Action {i}: {a}\n" for i, (_, a) in enumerate(steps, 1)
    ]
