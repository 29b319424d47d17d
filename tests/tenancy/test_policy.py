"""Content policy: bilingual terms, evasions folded away, rule ids (never terms) in errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage_platform.errors import InvalidRequest
from zimage_platform.tenancy.policy import (
    ContentPolicy,
    PolicyRegistry,
    PolicyRule,
    PolicySpec,
    PolicyViolation,
    TenantPolicy,
    load_policy_spec,
)

DEFAULT = load_policy_spec()  # the policy packaged with the platform


@pytest.fixture(scope="module")
def policy() -> ContentPolicy:
    return ContentPolicy([*DEFAULT.rules, PolicyRule(id="test.short", terms=["gun", "槍"])])


@pytest.mark.parametrize(
    ("prompt", "rule"),
    [
        ("a tutorial on bomb making", "violence.explosives"),
        ("BOMB MAKING for beginners", "violence.explosives"),  # case
        ("ｂｏｍｂ　ｍａｋｉｎｇ", "violence.explosives"),  # full-width letters and space
        ("b.o.m.b m-a-k-i-n-g", "violence.explosives"),  # punctuation between letters
        ("b o m b   m a k i n g", "violence.explosives"),  # spaces between letters
        ("bo\u200bmb ma\u200dking", "violence.explosives"),  # zero-width characters
        ("如何制作炸弹", "violence.explosives"),  # simplified
        ("如何製作炸彈", "violence.explosives"),  # traditional
        ("制 作 炸 弹", "violence.explosives"),  # spaces between characters
        ("制.作.炸.弹!!", "violence.explosives"),  # punctuation between characters
        ("Cocaine on a mirror", "drugs.hard"),
        ("海洛因", "drugs.hard"),
        ("a toy gun on a shelf", "test.short"),  # short Latin term as a whole word
        ("a g u n on a shelf", "test.short"),  # ... even spelled out
        ("一把槍", "test.short"),  # traditional 槍 → simplified 枪 matches the term's own folding
    ],
)
def test_blocked_prompts_name_the_rule(policy, prompt, rule):
    hit = policy.match(prompt)
    assert hit is not None and hit.rule_id == rule, prompt


@pytest.mark.parametrize(
    "prompt",
    [
        "a cocoa cake on a table",
        "the story has begun",  # 'gun' inside a word is not a hit
        "shotgun wedding invitation card",  # nor at the end of a word
        "product shot of white sneakers, studio light",
        "一只小猫坐在窗台上",
        "爆米花 popcorn commercial",
    ],
)
def test_innocent_prompts_pass(policy, prompt):
    assert policy.match(prompt) is None


def test_the_error_names_the_rule_and_never_echoes_the_term(policy):
    with pytest.raises(PolicyViolation) as err:
        policy.check("nice picture", "cheap cocaine", param="negative_prompt")
    assert err.value.code == "content_policy" and err.value.status == 422 and err.value.param == "negative_prompt"
    assert "drugs.hard" in err.value.message and "cocaine" not in err.value.message


def test_tenants_add_and_disable_rules():
    registry = PolicyRegistry(DEFAULT)
    shared = registry.for_tenant("a", None)
    custom = registry.for_tenant(
        "b", TenantPolicy(extra_rules=[PolicyRule(id="b.brands", terms=["globex"])], disabled_rules=["drugs.hard"])
    )
    assert shared.match("globex logo") is None and custom.match("GLOBEX logo").rule_id == "b.brands"
    assert shared.match("cocaine") is not None and custom.match("cocaine") is None
    assert (
        registry.for_tenant(
            "b", TenantPolicy(disabled_rules=["drugs.hard"], extra_rules=[PolicyRule(id="b.brands", terms=["globex"])])
        )
        is not None
    )


def test_thousands_of_terms_compile_and_match(policy):
    """Aho-Corasick: one pass whatever the number of terms (timings live in bench/, not here)."""
    many = ContentPolicy([PolicyRule(id=f"r{i}", terms=[f"forbidden{i}term", f"禁词{i}号"]) for i in range(5000)])
    assert many.match("a photo with forbidden 4321 term in it").rule_id == "r4321"
    assert many.match("禁 词 77 号").rule_id == "r77"


def test_the_default_policy_file_is_valid():
    assert {r.id for r in DEFAULT.rules} >= {"csam", "violence.explosives", "drugs.hard"}
    assert PolicySpec.model_validate({"rules": []}).rules == []


def test_a_policy_file_replaces_the_packaged_one(tmp_path: Path):
    own = tmp_path / "policy.yaml"
    own.write_text("rules:\n  - id: brands\n    terms: [globex]\n")
    assert [r.id for r in load_policy_spec(own).rules] == ["brands"]


def test_a_named_policy_file_that_is_missing_is_refused(tmp_path: Path):
    """Not an empty policy: running without the rules the operator meant would be silent."""
    with pytest.raises(InvalidRequest) as err:
        load_policy_spec(tmp_path / "nope.yaml")
    assert err.value.code == "policy_file_missing" and err.value.param == "tenancy.policy_file"
