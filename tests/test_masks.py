"""Chat -> input_ids + reason/act masks, with the real SmolLM2 tokenizer (ChatML) and hand-built offsets."""

from __future__ import annotations

import copy
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sad_ray.method.masks import build_masks, char_spans_to_token_masks, end_of_turn_marker
from sad_ray.method.segment import Span

THOUGHTS = [
    "Thought: I need to find a mug. A mug is more likely in a cabinet or on a countertop.\n",
    "Thought: Now I find a mug (1). Next, I need to take it.\n",
    "Thought: I have the mug. Now I put it in the coffeemachine.\n",
]
ACTIONS = [
    "Action: go to countertop 1",
    "Action: take mug 1 from countertop 1",
    "Action: put mug 1 in/on coffeemachine 1",
]
OBSERVATIONS = [
    "Observation: On the countertop 1, you see a mug 1, and a saltshaker 2.",
    "Observation: You pick up the mug 1 from the countertop 1.",
]
CHAT = [
    {"role": "system", "content": "You are an agent in a household. Answer with Thought: and Action: lines."},
    {"role": "user", "content": "Your task is to: put a mug in coffeemachine."},
    {"role": "assistant", "content": THOUGHTS[0] + ACTIONS[0]},
    {"role": "user", "content": OBSERVATIONS[0]},
    {"role": "assistant", "content": THOUGHTS[1] + ACTIONS[1]},
    {"role": "user", "content": OBSERVATIONS[1]},
    {"role": "assistant", "content": THOUGHTS[2] + ACTIONS[2]},
]


def decoded_runs(tokenizer, input_ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """Decode each maximal run of consecutive masked tokens."""
    idx = np.flatnonzero(mask)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if idx.size else []
    return [tokenizer.decode(input_ids[r].tolist()) for r in runs]


@pytest.fixture(scope="module")
def chat_result(starter_tokenizer):
    return build_masks(starter_tokenizer, CHAT, "react")


# ---- build_masks with the real tokenizer ---------------------------------------------------------------


def test_thoughts_and_actions_round_trip(starter_tokenizer, chat_result):
    r = chat_result
    assert decoded_runs(starter_tokenizer, r.input_ids, r.reason_mask) == THOUGHTS
    assert decoded_runs(starter_tokenizer, r.input_ids, r.act_mask) == [a + "<|im_end|>" for a in ACTIONS]
    assert not r.issues


def test_result_types_and_invariants(starter_tokenizer, chat_result):
    r = chat_result
    assert r.input_ids.dtype == np.int32 and r.reason_mask.dtype == r.act_mask.dtype == np.bool_
    assert r.input_ids.shape == r.reason_mask.shape == r.act_mask.shape
    assert r.text == starter_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert r.input_ids.tolist() == starter_tokenizer(r.text, add_special_tokens=False)["input_ids"]
    assert not (r.reason_mask & r.act_mask).any()
    assert not r.reason_mask[0] and not r.act_mask[0]
    assert r.reasoning_length == r.reason_mask.sum() > 0 and r.action_length == r.act_mask.sum() > 0


def test_prompt_and_observation_tokens_are_not_supervised(starter_tokenizer, chat_result):
    r = chat_result
    offsets = starter_tokenizer(r.text, return_offsets_mapping=True, add_special_tokens=False)[
        "offset_mapping"
    ]
    supervised = r.reason_mask | r.act_mask
    # Character ranges of each assistant content plus the "<|im_end|>" right after it.
    regions = []
    for turn in CHAT:
        if turn["role"] == "assistant":
            start = r.text.index(turn["content"])
            regions.append((start, start + len(turn["content"]) + len("<|im_end|>")))
    inside = np.array([any(a <= s and e <= b for a, b in regions) for s, e in offsets])
    assert (supervised == inside).all()
    for turn in CHAT:
        if turn["role"] != "assistant":
            start = r.text.index(turn["content"])
            touching = [
                i for i, (s, e) in enumerate(offsets) if s < start + len(turn["content"]) and e > start
            ]
            assert touching and not supervised[touching].any()


def test_end_of_turn_supervised_after_assistant_only(starter_tokenizer, chat_result):
    r = chat_result
    im_end = starter_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = np.flatnonzero(r.input_ids == im_end)
    assert len(ends) == len(CHAT)
    roles = [t["role"] for t in CHAT]
    assert r.act_mask[ends].tolist() == [role == "assistant" for role in roles]
    assert not r.reason_mask[ends].any()

    plain = build_masks(starter_tokenizer, CHAT, "react", supervise_end_of_turn=False)
    assert not (plain.reason_mask | plain.act_mask)[ends].any()
    assert plain.action_length == r.action_length - 3 and plain.reasoning_length == r.reasoning_length


def test_turn_ending_in_thought_or_observation(starter_tokenizer):
    chat = [
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "Thought: I should look it up."},
        {"role": "user", "content": "Observation: OK."},
        {
            "role": "assistant",
            "content": "Thought: Shakespeare.\nAction: Finish[Shakespeare]\nObservation: right",
        },
    ]
    r = build_masks(starter_tokenizer, chat, "react")
    assert r.issues == {"no_action": 1, "observation_in_turn": 1}
    # The stop marker joins the kind of the turn's last span, even past an observation the model wrote.
    assert decoded_runs(starter_tokenizer, r.input_ids, r.reason_mask) == [
        "Thought: I should look it up.<|im_end|>",
        "Thought: Shakespeare.\n",
    ]
    assert decoded_runs(starter_tokenizer, r.input_ids, r.act_mask) == [
        "Action: Finish[Shakespeare]\n",
        "<|im_end|>",
    ]


def test_unparsed_text_reason_vs_drop(starter_tokenizer):
    chat = [
        {"role": "user", "content": "Task: open the drawer."},
        {"role": "assistant", "content": "Okay.\nThought: The drawer is closed.\nAction: open drawer 1"},
    ]
    kept = build_masks(starter_tokenizer, chat, "react", on_unparsed="reason")
    dropped = build_masks(starter_tokenizer, chat, "react", on_unparsed="drop")
    assert decoded_runs(starter_tokenizer, kept.input_ids, kept.reason_mask) == [
        "Okay.\nThought: The drawer is closed.\n"
    ]
    assert decoded_runs(starter_tokenizer, dropped.input_ids, dropped.reason_mask) == [
        "Thought: The drawer is closed.\n"
    ]
    assert (kept.act_mask == dropped.act_mask).all()
    assert kept.issues == dropped.issues == {"unmatched_text": 1}


def test_other_formats_and_empty_turn(starter_tokenizer):
    chat = [
        {"role": "user", "content": "i need a citrus deodorant"},
        {"role": "assistant", "content": "think[I should search first.]"},
        {"role": "user", "content": "OK."},
        {"role": "assistant", "content": "search[citrus deodorant]"},
        {"role": "user", "content": "[Back to Search] B078GWRC1J"},
        {"role": "assistant", "content": ""},
    ]
    r = build_masks(starter_tokenizer, chat, "webshop")
    assert decoded_runs(starter_tokenizer, r.input_ids, r.reason_mask) == [
        "think[I should search first.]<|im_end|>"
    ]
    assert decoded_runs(starter_tokenizer, r.input_ids, r.act_mask) == ["search[citrus deodorant]<|im_end|>"]
    assert r.issues == {"empty_turn": 1}


def test_leading_whitespace_token_straddling_the_header_ties_to_the_span(starter_tokenizer):
    # SmolLM2 merges the header's "\n" and the content's leading " " into one token "\n " (1 none + 1 reason
    # character): the act > reason > none tie-break supervises it.
    chat = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "  Thought: t\nAction: look"}]
    r = build_masks(starter_tokenizer, chat, "react")
    assert decoded_runs(starter_tokenizer, r.input_ids, r.reason_mask) == ["\n  Thought: t\n"]


def test_trimming_template_is_located_by_stripped_content(starter_tokenizer):
    tok = copy.deepcopy(starter_tokenizer)
    tok.chat_template = tok.chat_template.replace("message['content']", "(message['content'] | trim)")
    chat = [
        {"role": "user", "content": " go "},
        {"role": "assistant", "content": "Thought: t\nAction: look\n\n"},
    ]
    r = build_masks(tok, chat, "react")
    assert decoded_runs(tok, r.input_ids, r.act_mask) == ["Action: look<|im_end|>"]


def test_template_that_rewrites_content_is_a_clear_error(starter_tokenizer):
    tok = copy.deepcopy(starter_tokenizer)
    tok.chat_template = tok.chat_template.replace("message['content']", "message['content'].upper()")
    with pytest.raises(ValueError, match=r"turns\[2\] \(assistant\).*not in the rendered chat"):
        build_masks(tok, CHAT, "react")


@pytest.mark.parametrize(
    ("turns", "match"),
    [
        ({"role": "user", "content": "x"}, "turns must be a list"),
        ([{"role": "user", "content": "x"}, "hello"], r"turns\[1\] must be a dict"),
        ([{"role": "user", "content": "x"}, {"content": "y"}], r"turns\[1\] has no 'role'"),
        ([{"role": "user"}], r"turns\[0\] has no 'content'"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],
            r"turns\[1\]\['content'\] must be a str",
        ),
    ],
)
def test_bad_turns(starter_tokenizer, turns, match):
    with pytest.raises(ValueError, match=match):
        build_masks(starter_tokenizer, turns, "react")


def test_slow_tokenizer_is_refused(starter_tokenizer):
    class Slow:
        is_fast = False
        eos_token = "<|im_end|>"
        all_special_tokens = ["<|im_end|>"]

        def apply_chat_template(self, turns, **kwargs):
            return starter_tokenizer.apply_chat_template(turns, **kwargs)

    with pytest.raises(ValueError, match="fast tokenizer"):
        build_masks(Slow(), CHAT, "react")


def test_unknown_format_propagates(starter_tokenizer):
    with pytest.raises(ValueError, match="unknown segmentation format"):
        build_masks(starter_tokenizer, CHAT, "nope")


@pytest.mark.parametrize(
    ("text", "end", "eos", "expected"),
    [
        ("<|im_start|>assistant\nhi<|im_end|>\n", 24, "<|im_end|>", 34),  # ChatML
        ("[INST] q [/INST] hi </s>[INST]", 19, "</s>", 24),  # Llama-2 writes a space before eos
        ("hi<|eot_id|><|start_header_id|>user<|end_header_id|>\n", 2, "<|end_of_text|>", 12),  # Llama-3
        ("hi\n<|im_start|>user", 2, "<|im_end|>", None),  # nothing on the same line
        ("hi and more<|im_end|>", 2, "<|im_end|>", None),  # plain text before the marker
    ],
)
def test_end_of_turn_marker(text, end, eos, expected):
    specials = ["<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    assert end_of_turn_marker(text, end, eos, specials) == expected


# ---- char_spans_to_token_masks -------------------------------------------------------------------------


def test_majority_rule_and_ties_on_hand_built_offsets():
    # chars: 0-3 reason, 4-5 none, 6-9 act, 10-11 none
    spans = [Span(0, 4, "reason"), Span(6, 10, "act")]
    offsets = [
        (0, 3),  # wholly reason
        (3, 5),  # 1 reason, 1 none: tie -> reason
        (3, 7),  # 1 reason, 2 none, 1 act: none wins
        (5, 7),  # 1 none, 1 act: tie -> act
        (4, 7),  # 2 none, 1 act -> neither
        (7, 10),  # wholly act
        (9, 12),  # 1 act, 2 none -> neither
        (2, 4),  # overlapping offsets are judged independently -> reason
        (2, 2),  # zero-width inside a span -> neither
        (0, 0),  # zero-width special token -> neither
    ]
    reason, act = char_spans_to_token_masks(offsets, spans)
    assert reason.tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    assert act.tolist() == [0, 0, 0, 1, 0, 1, 0, 0, 0, 0]


def test_reason_act_tie_goes_to_act():
    reason, act = char_spans_to_token_masks([(0, 4), (2, 6)], [Span(0, 3, "reason"), Span(3, 6, "act")])
    # token 0: 3 reason vs 1 act; token 1: 1 reason vs 3 act; then an exact 2-2 tie:
    assert reason.tolist() == [True, False] and act.tolist() == [False, True]
    reason, act = char_spans_to_token_masks([(1, 5)], [Span(0, 3, "reason"), Span(3, 6, "act")])
    assert not reason[0] and act[0]


def test_overlapping_spans_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        char_spans_to_token_masks([(0, 2)], [Span(0, 3, "reason"), Span(2, 4, "act")])


def test_empty_inputs():
    reason, act = char_spans_to_token_masks([], [Span(0, 3, "act")])
    assert reason.shape == act.shape == (0,) and reason.dtype == np.bool_


@st.composite
def offsets_and_spans(draw):
    n_chars = draw(st.integers(1, 40))
    cuts = sorted(draw(st.sets(st.integers(0, n_chars), max_size=10)) | {0, n_chars})
    spans = [
        Span(a, b, kind)
        for a, b in pairwise(cuts)
        if (kind := draw(st.sampled_from(["reason", "act", None]))) and a < b
    ]
    bounds = st.integers(0, n_chars)
    offsets = [tuple(sorted(draw(st.tuples(bounds, bounds)))) for _ in range(draw(st.integers(0, 30)))]
    return offsets, spans


@settings(max_examples=300, deadline=None)
@given(offsets_and_spans())
def test_masks_follow_the_majority_rule(case):
    offsets, spans = case
    reason, act = char_spans_to_token_masks(offsets, spans)
    assert len(reason) == len(act) == len(offsets)
    assert not (reason & act).any()
    for t, (s, e) in enumerate(offsets):
        counts = {"none": e - s, "reason": 0, "act": 0}
        for span in spans:
            overlap = max(0, min(e, span.end) - max(s, span.start))
            counts[span.kind] += overlap
            counts["none"] -= overlap
        best = max(counts.values())
        expected = next(k for k in ("act", "reason", "none") if counts[k] == best) if e > s else "none"
        assert (reason[t], act[t]) == (expected == "reason", expected == "act")
        if e > s and any(span.start <= s and e <= span.end for span in spans):
            inside = next(span for span in spans if span.start <= s and e <= span.end)
            assert (reason[t], act[t]) == (inside.kind == "reason", inside.kind == "act")
