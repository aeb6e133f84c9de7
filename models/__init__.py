"""Prompts, verdict parsing and generation engines (imports ``rsafe.policies`` only)."""

from rsafe.models.config import EngineConfig, GenerationConfig, InputLimits
from rsafe.models.engines import Completion, EngineError, make_backend
from rsafe.models.guard import Guard, GuardRequest
from rsafe.models.prompt import build_user_turn, neutralise, prompt_hash, render_prompt
from rsafe.models.verdict import Label, ParsedOutput, Verdict, parse_output, unsafe_probability

__all__ = [
    "Completion", "EngineConfig", "EngineError", "GenerationConfig", "Guard", "GuardRequest", "InputLimits",
    "Label", "ParsedOutput", "Verdict", "build_user_turn", "make_backend", "neutralise", "parse_output",
    "prompt_hash", "render_prompt", "unsafe_probability",
]
