"""Safety policies: the list of unsafe-content categories a guard model judges against.

A policy is a parameter of inference (RSafe's "adaptive" use): the same checkpoint reasons against
whichever categories the caller chooses. Policies live in YAML files; a directory of them is a
registry by name. ``Policy.version`` is a stable hash of the content, so every verdict can name
exactly the policy text that judged it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: Markers of the RSafe prompt template. Policy text may not contain them (it would forge the
#: template); message content that contains them is neutralised by ``rsafe.models.prompt``.
TEMPLATE_MARKER_RE = re.compile(
    r"<\s*(BEGIN|END)\s+(UNSAFE\s+CONTENT\s+CATEGORIES|CONVERSATION)\s*>", re.IGNORECASE
)

#: Upper bound on the rendered category block, in characters. The whole prompt must fit the
#: guard model's context next to the message; a policy larger than this is almost surely a mistake.
MAX_POLICY_CHARS = 12_000

CODE_RE = r"^[A-Za-z][A-Za-z0-9_.\-]{0,15}$"
NAME_RE = r"^[a-z0-9][a-z0-9_.\-]{0,63}$"


class Level(str, Enum):
    """What a policy (or a request) moderates."""

    PROMPT = "prompt"
    """The user's message (RSafe prompt-level template, 'User' messages)."""
    RESPONSE = "response"
    """The assistant's reply to a user message (response-level template, 'Agent' messages)."""
    BOTH = "both"
    """Either, chosen per request by whether a response is present (``auto`` is accepted too)."""

    @classmethod
    def _missing_(cls, value: object) -> Level | None:
        return cls.BOTH if isinstance(value, str) and value.lower() == "auto" else None


def _single_line(value: str, field: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"{field} must be a single line (found a line break)")
    if TEMPLATE_MARKER_RE.search(value):
        raise ValueError(f"{field} must not contain a template marker like <END CONVERSATION>")
    return value.strip()


class Category(BaseModel):
    """One unsafe-content category, rendered as one line: ``CODE - Name[: description][ (e.g. ...)]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: Annotated[str, Field(pattern=CODE_RE, description="Short code, e.g. 'U1'.")]
    name: Annotated[str, Field(min_length=1, max_length=200, description="Category name.")]
    description: Annotated[str | None, Field(default=None, max_length=1000)] = None
    examples: Annotated[list[Annotated[str, Field(min_length=1, max_length=300)]], Field(max_length=10)] = []

    @field_validator("name", "description")
    @classmethod
    def _check_text(cls, value: str | None, info) -> str | None:
        return None if value is None else _single_line(value, info.field_name)

    @field_validator("examples")
    @classmethod
    def _check_examples(cls, value: list[str]) -> list[str]:
        return [_single_line(v, "examples") for v in value]

    def render(self, code_width: int) -> str:
        """The category's line in the prompt; codes are padded so names align (``U1  - ``)."""
        line = f"{self.code.ljust(code_width)} - {self.name}"
        if self.description:
            line += f": {self.description}"
        if self.examples:
            line += " (e.g. " + "; ".join(f'"{e}"' for e in self.examples) + ")"
        return line


class Policy(BaseModel):
    """A named safety policy. Immutable; ``version`` is a hash of everything that shapes a verdict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=NAME_RE, description="Registry name, e.g. 'rsafe-default'.")]
    description: str = ""
    level: Level = Level.BOTH
    categories: Annotated[list[Category], Field(min_length=1, max_length=64)]
    unsafe_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """A verdict is ``unsafe`` when the model's unsafe probability is at least this."""

    @model_validator(mode="after")
    def _check(self) -> Policy:
        seen: dict[str, int] = {}
        for i, cat in enumerate(self.categories):
            key = cat.code.lower()
            if key in seen:
                raise ValueError(
                    f"categories.{i}.code: duplicate code {cat.code!r} (also categories.{seen[key]})"
                )
            seen[key] = i
        size = len(self.render_categories())
        if size > MAX_POLICY_CHARS:
            raise ValueError(
                f"categories: rendered policy is {size} characters, over the limit of {MAX_POLICY_CHARS}; "
                "shorten descriptions or examples"
            )
        return self

    def render_categories(self) -> str:
        """The category lines exactly as they appear inside the prompt."""
        return self._rendered

    @cached_property
    def _rendered(self) -> str:
        width = max(len(c.code) for c in self.categories)
        return "\n".join(c.render(width) for c in self.categories)

    @cached_property
    def version(self) -> str:
        """Stable content hash (12 hex digits) of the fields that shape a verdict."""
        payload = self.model_dump(mode="json", exclude={"description"})
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]

    def category(self, code: str) -> Category | None:
        return next((c for c in self.categories if c.code.lower() == code.lower()), None)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Policy:
        """A copy with ``update`` applied, validated again.

        pydantic's ``model_copy`` copies the instance dict as it is: the cached rendering and
        ``version`` of the original would describe the copy (a policy without U13 rendering U13),
        and the update would skip validation. Here the copy is built from its fields.
        """
        data = self.model_dump()
        data.update(update or {})
        return type(self).model_validate(data)


class PolicyError(ValueError):
    """A policy file or name that cannot be used; the message names the file and the field."""


class UnknownPolicyError(PolicyError, KeyError):
    def __str__(self) -> str:  # KeyError would add quotes
        return self.args[0]


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)  # model-level checks name their field themselves
    return "; ".join(parts)


def policy_from_dict(data: object, source: str = "<dict>") -> Policy:
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy must be a mapping with name and categories, got {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as err:
        raise PolicyError(f"{source}: {_format_validation_error(err)}") from None


def load_policy(path: str | Path) -> Policy:
    """Load and validate one policy YAML file; errors name the file and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(f"{path}: cannot read policy file: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PolicyError(f"{path}: not valid YAML: {err}") from None
    return policy_from_dict(data, str(path))


BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_POLICY = "rsafe-default"


class PolicyRegistry:
    """Policies by name, loaded from one or more directories of ``*.yaml`` files."""

    def __init__(self, policies: dict[str, Policy] | None = None, sources: dict[str, str] | None = None):
        self._policies: dict[str, Policy] = dict(policies or {})
        self._sources: dict[str, str] = dict(sources or {})

    @classmethod
    def from_dirs(cls, *dirs: str | Path, include_bundled: bool = True) -> PolicyRegistry:
        reg = cls()
        for d in ([BUNDLED_DIR] if include_bundled else []) + [Path(x) for x in dirs]:
            if not d.is_dir():
                raise PolicyError(f"{d}: policy directory does not exist")
            for f in sorted(list(d.glob("*.yaml")) + list(d.glob("*.yml"))):
                reg.add(load_policy(f), str(f))
        return reg

    def add(self, policy: Policy, source: str = "<memory>") -> None:
        """Register a policy. A user policy may replace a bundled one of the same name; two user
        policies with one name are an error."""
        previous = self._sources.get(policy.name)
        if previous is not None and Path(previous).parent != BUNDLED_DIR:
            raise PolicyError(
                f"{source}: policy name {policy.name!r} is already defined in {self._sources[policy.name]}"
            )
        self._policies[policy.name] = policy
        self._sources[policy.name] = source

    def get(self, name: str) -> Policy:
        try:
            return self._policies[name]
        except KeyError:
            raise UnknownPolicyError(
                f"unknown policy {name!r}; known policies: {', '.join(sorted(self._policies)) or '(none)'}"
            ) from None

    def resolve(self, name_or_path: str) -> Policy:
        """A registered name, or a path to a YAML file."""
        if name_or_path in self._policies:
            return self._policies[name_or_path]
        if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
            return load_policy(name_or_path)
        return self.get(name_or_path)

    def source(self, name: str) -> str:
        return self._sources[name]

    def names(self) -> list[str]:
        return sorted(self._policies)

    def __contains__(self, name: object) -> bool:
        return name in self._policies

    def __len__(self) -> int:
        return len(self._policies)


def default_policy() -> Policy:
    return load_policy(BUNDLED_DIR / f"{DEFAULT_POLICY}.yaml")
