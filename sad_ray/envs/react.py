"""ReAct prompts per environment (the ones teacher and student both see) and expert demonstrations as chats.

A demonstration plays the expert's actions in the real environment, so every observation in it is the
environment's own text, and writes each step as "Thought: ...\nAction: ...".
"""

from __future__ import annotations

from collections.abc import Sequence

from sad_ray.envs.base import Environment, Episode, Task

FORMAT_RULES = (
    "Answer every turn with exactly two lines:\n"
    "Thought: <your reasoning about the current state and what to do next>\n"
    "Action: <one action>"
)

INSTRUCTIONS = {
    "alfworld": (
        "You are an agent in a household. You see the room through text observations and act with text commands "
        "such as 'go to cabinet 1', 'open drawer 2', 'take mug 1 from countertop 1', 'move mug 1 to shelf 1', "
        "'heat egg 1 with microwave 1', 'cool apple 1 with fridge 1', 'clean knife 1 with sinkbasin 1', "
        "'use desklamp 1', 'examine book 1', 'inventory' and 'look'. Search receptacles systematically and "
        "complete the task."
    ),
    "webshop": (
        "You are shopping on a website for the product that fits the instruction. Actions are "
        "'search[keywords]' on the search page and 'click[button]' for any button shown in brackets, such as an "
        "item code, an option value, '< Prev', 'Next >', 'Back to Search', 'Description', 'Features', "
        "'Reviews' or 'Buy Now'. Choose the options the instruction asks for, then click 'Buy Now'."
    ),
    "hotpotqa": (
        "You answer a question by looking things up. Actions are 'search[entity]' (the first paragraph of the "
        "entity's page, or similar entities if there is none), 'lookup[keyword]' (the next sentence with the "
        "keyword on the current page) and 'finish[answer]' with a short answer."
    ),
    "seed-household": (
        "You are an agent in a household. Solve the task step by step with commands such as 'go to X', "
        "'open X', 'take Y from X' and 'move Y to X'."
    ),
}


def system_prompt(env_name: str, few_shot: Sequence[Episode] = ()) -> str:
    """The instruction for an environment, the answer format, and optional few-shot transcripts."""
    if env_name not in INSTRUCTIONS:
        raise ValueError(f"no ReAct prompt for environment {env_name!r}; known: {', '.join(sorted(INSTRUCTIONS))}")
    parts = [INSTRUCTIONS[env_name], FORMAT_RULES]
    for i, ep in enumerate(few_shot, 1):
        lines = [f"Example {i}:"]
        for turn in ep.turns:
            if turn["role"] == "system":
                continue
            lines.append(turn["content"] if turn["role"] == "assistant" else f"Observation: {turn['content']}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def assistant_turn(thought: str, action: str) -> str:
    return f"Thought: {thought}\nAction: {action}"


def demonstration(env: Environment, task: Task, few_shot: Sequence[Episode] = ()) -> Episode:
    """Play the expert in `env` and return the chat; raises if the expert does not win (a broken expert)."""
    observation = env.reset(task)
    turns = [{"role": "system", "content": system_prompt(env.name, few_shot)},
             {"role": "user", "content": observation}]
    result = None
    steps = env.expert_steps(task)
    played = 0
    for step in steps:
        played += 1
        turns.append({"role": "assistant", "content": assistant_turn(step.thought, step.action)})
        result = env.step(step.action)
        if result.done:
            break
        turns.append({"role": "user", "content": result.observation})
    won = bool(result is not None and result.info.get("won"))
    if not won:
        raise RuntimeError(f"the {env.name} expert did not win task {task.id} ({len(steps)} steps)")
    return Episode(id=task.id, env=env.name, task_type=task.task_type, split=task.split, turns=tuple(turns),
                   success=True, reward=float(result.reward), steps=played)


# ------------------------------------------------------------------------------------------------ context window


def _chars(turns: Sequence[dict[str, str]]) -> int:
    return sum(len(t["content"]) for t in turns)


def context_window(turns: Sequence[dict[str, str]], max_chars: int | None) -> list[dict[str, str]]:
    """What the agent sees of a long chat: the system prompt, the first observation (it states the task) and
    the most recent steps that fit in `max_chars` characters of content; the whole chat when it fits.

    A window starts at an assistant turn, so the chat still alternates; the last turn is always kept, even
    when it alone is over the budget. Training windows (`episode_windows`) and the agent loop use this one
    rule, so the student and teacher are trained on the contexts they are later played with.
    """
    turns = list(turns)
    if max_chars is None or len(turns) <= 3 or _chars(turns) <= max_chars:
        return turns
    head, rest = turns[:2], turns[2:]
    budget = max_chars - _chars(head)
    start, used = len(rest) - 1, len(rest[-1]["content"])
    for i in range(len(rest) - 2, -1, -1):
        used += len(rest[i]["content"])
        if used > budget:
            break
        if rest[i]["role"] == "assistant":
            start = i
    while start < len(rest) - 1 and rest[start]["role"] != "assistant":
        start += 1
    return head + rest[start:]


def episode_windows(turns: Sequence[dict[str, str]], max_chars: int | None) -> list[tuple[list[dict[str, str]], list[int]]]:
    """Cut a chat into training windows: `[(chat, supervised_turn_indices), ...]`.

    Every assistant turn is supervised in exactly one window. A window opens with the recent context that fits
    in half the budget (`context_window(..., max_chars // 2)`: the agent loop shows at least that much) and runs
    on while it fits in `max_chars`, so a long episode costs about two windows per budget's worth of steps
    rather than one window per step; assistant turns inside the opening context are history, not supervised
    again.
    """
    turns = list(turns)
    assistant = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    if max_chars is None or _chars(turns) <= max_chars or not assistant:
        return [(turns, assistant)]
    windows: list[tuple[list[dict[str, str]], list[int]]] = []
    i = assistant[0]
    while i < len(turns):
        chat = context_window(turns[:i], max_chars // 2)
        chat.append(turns[i])
        supervised = [len(chat) - 1]
        j = i + 1  # turns[j] is the observation after the last supervised turn, turns[j + 1] the next action
        while j + 1 < len(turns) and _chars(chat) + _chars(turns[j : j + 2]) <= max_chars:
            chat.extend(turns[j : j + 2])
            supervised.append(len(chat) - 1)
            j += 2
        windows.append((chat, supervised))
        i = j + 1
    return windows
