"""Policies: the bundled set, versions, YAML loading and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsafe.policies import (
    BUNDLED_DIR, Level, Policy, PolicyError, PolicyRegistry, UnknownPolicyError, default_policy, load_policy,
)

NBH = "\u2011"


def test_default_policy_has_the_18_reference_categories():
    p = default_policy()
    assert p.name == "rsafe-default" and p.level == Level.BOTH
    assert [c.code for c in p.categories] == [f"U{i}" for i in range(1, 19)]
    names = {c.code: c.name for c in p.categories}
    assert names["U3"] == f"Non{NBH}violent Crime & Fraud"
    assert names["U9"] == f"Self{NBH}Harm & Suicide"
    assert names["U15"] == f"Child Abuse (Non{NBH}Sexual)"
    assert names["U16"] == f"Environmental & Public{NBH}Safety Harm"
    assert names["U18"] == f"National{NBH}Security Espionage"
    assert names["U17"] == "Manipulation & Coercion / Human Trafficking"


def test_rendered_categories_pad_codes_so_names_align():
    lines = default_policy().render_categories().split("\n")
    assert lines[0] == "U1  - Violence & Physical Harm"
    assert lines[9] == "U10 - Privacy & PII"
    assert len(lines) == 18


def test_bundled_registry_has_tailored_policies():
    reg = PolicyRegistry.from_dirs()
    assert {"rsafe-default", "kids-platform", "financial-advice"} <= set(reg.names())
    kids = reg.get("kids-platform")
    assert kids.unsafe_threshold < 0.5
    line = kids.render_categories().split("\n")[2]
    assert line.startswith("K3 - Contact & Personal Information: ") and '(e.g. "what school' in line


def test_version_is_a_stable_content_hash():
    p = default_policy()
    again = load_policy(BUNDLED_DIR / "rsafe-default.yaml")
    assert p.version == again.version and len(p.version) == 12
    changed = Policy.model_validate({**p.model_dump(), "unsafe_threshold": 0.7})
    assert changed.version != p.version
    described = Policy.model_validate({**p.model_dump(), "description": "other words"})
    assert described.version == p.version  # the description does not shape verdicts


def test_model_copy_renders_and_versions_the_copy_not_the_original():
    p = default_policy()
    rendered, version = p.render_categories(), p.version  # cached on the original first
    without = p.model_copy(update={"name": "no-u13", "categories": [c for c in p.categories if c.code != "U13"]})
    assert "U13" in rendered and "U13" not in without.render_categories()
    assert without.version != version and len(without.render_categories().split("\n")) == 17
    assert p.model_copy(update={"description": "other words"}).version == version
    with pytest.raises(ValueError, match="duplicate code"):  # an update is validated like a file
        p.model_copy(update={"categories": [*p.categories, p.categories[0]]})


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return f


@pytest.mark.parametrize(
    "body, expected",
    [
        ("name: x\ncategories: []\n", "categories: List should have at least 1 item"),
        ("name: x\n", "categories: Field required"),
        ("name: x\nlevel: chat\ncategories: [{code: A, name: a}]\n", "level: Input should be 'prompt', 'response' or 'both'"),
        ("name: x\ncategories: [{code: A, name: a}, {code: a, name: b}]\n", "categories.1.code: duplicate code 'a'"),
        ("name: x\ncategories: [{code: A, name: 'a <END CONVERSATION> b'}]\n", "categories.0.name: name must not contain a template marker"),
        ("name: x\ncategories: [{code: A, name: a, colour: red}]\n", "categories.0.colour: Extra inputs are not permitted"),
        ("name: Bad Name\ncategories: [{code: A, name: a}]\n", "name: String should match pattern"),
        ("name: x\nunsafe_threshold: 2\ncategories: [{code: A, name: a}]\n", "unsafe_threshold: Input should be less than or equal to 1"),
        ("- just\n- a list\n", "a policy must be a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_policy_files_name_the_file_and_the_field(tmp_path, body, expected):
    f = _write(tmp_path, body)
    with pytest.raises(PolicyError) as err:
        load_policy(f)
    assert str(f) in str(err.value)
    assert expected in str(err.value)


def test_oversized_policy_is_rejected(tmp_path):
    cats = "\n".join(f"  - {{code: C{i}, name: n{i}, description: '{'x' * 900}'}}" for i in range(20))
    f = _write(tmp_path, f"name: big\ncategories:\n{cats}\n")
    with pytest.raises(PolicyError, match=r"categories: rendered policy is \d+ characters, over the limit"):
        load_policy(f)


def test_registry_from_dir_and_unknown_name(tmp_path):
    _write(tmp_path, "name: shop\ncategories: [{code: S1, name: Counterfeits}]\n", "shop.yaml")
    reg = PolicyRegistry.from_dirs(tmp_path)
    assert reg.get("shop").categories[0].name == "Counterfeits"
    with pytest.raises(UnknownPolicyError, match="unknown policy 'nope'; known policies: .*shop"):
        reg.get("nope")


def test_registry_rejects_duplicate_names_in_one_dir(tmp_path):
    _write(tmp_path, "name: dup\ncategories: [{code: A, name: a}]\n", "a.yaml")
    _write(tmp_path, "name: dup\ncategories: [{code: B, name: b}]\n", "b.yaml")
    with pytest.raises(PolicyError, match="policy name 'dup' is already defined in"):
        PolicyRegistry.from_dirs(tmp_path, include_bundled=False)


def test_missing_policy_dir_is_an_error(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        PolicyRegistry.from_dirs(tmp_path / "nope")
