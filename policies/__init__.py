"""Safety policies (imports nothing else of rsafe)."""

from rsafe.policies.policy import (
    BUNDLED_DIR,
    DEFAULT_POLICY,
    MAX_POLICY_CHARS,
    TEMPLATE_MARKER_RE,
    Category,
    Level,
    Policy,
    PolicyError,
    PolicyRegistry,
    UnknownPolicyError,
    default_policy,
    load_policy,
    policy_from_dict,
)
from rsafe.policies.store import (
    PolicyIntegrityError,
    PolicyStore,
    StoredPolicy,
    parse_key,
    policy_key,
)

__all__ = [
    "BUNDLED_DIR", "DEFAULT_POLICY", "MAX_POLICY_CHARS", "TEMPLATE_MARKER_RE", "Category", "Level",
    "Policy", "PolicyError", "PolicyRegistry", "UnknownPolicyError", "default_policy", "load_policy",
    "policy_from_dict", "PolicyIntegrityError", "PolicyStore", "StoredPolicy", "parse_key", "policy_key",
]
