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
