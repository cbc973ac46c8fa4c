"""HotPotQA for ReAct agents: an offline Wikipedia stand-in built from real geographic facts, or real HotPotQA JSON."""

from sad_ray.envs.hotpotqa.env import HotPotQAEnv
from sad_ray.envs.hotpotqa.questions import Hop, Question
from sad_ray.envs.hotpotqa.scoring import exact_match, f1_score, normalize_answer

__all__ = ["Hop", "HotPotQAEnv", "Question", "exact_match", "f1_score", "normalize_answer"]
