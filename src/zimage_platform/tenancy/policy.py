"""Content policy: bilingual blocked terms, matched after normalisation, in microseconds.

Normalisation defeats the usual evasions before matching:

- Unicode NFKC (full-width ``ＢＯＭＢ`` → ``BOMB``, compatibility forms, ligatures), then casefold;
- traditional → simplified Chinese (OpenCC ``t2s``), so one list covers both scripts;
- zero-width characters removed; spaces and punctuation inserted between characters ignored.

Terms are matched with an Aho-Corasick automaton (``pyahocorasick``): one pass over the prompt
whatever the number of terms. Two views of the prompt are searched:

- ``compact``: every separator removed — catches ``b.o.m.b`` and ``炸 弹``; used for CJK terms
  and for Latin terms long enough not to appear inside innocent words;
- ``words``: words padded by single spaces, runs of single letters rejoined (``g u n`` → ``gun``)
  — catches short Latin terms as whole words without flagging ``begun``.

A hit names the rule, never the term (error messages must not echo blocklists back).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from zimage_platform.errors import InvalidRequest, PlatformError

#: Latin terms at least this long are matched in the compact view too.
COMPACT_MIN_LATIN = 5
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_SEPARATORS = re.compile(r"[\W_]+", re.UNICODE)
_LATIN = re.compile(r"^[a-z0-9]+$")


class PolicyViolation(PlatformError):
    code = "content_policy"
    status = 422


class PolicyRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{1,63}$")
    description: str = ""
    terms: list[str] = Field(min_length=1)


class PolicySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[PolicyRule] = Field(default_factory=list)


class TenantPolicy(BaseModel):
    """A tenant's changes to the shared default: extra rules, and default rules switched off."""

    model_config = ConfigDict(extra="forbid")
    extra_rules: list[PolicyRule] = Field(default_factory=list)
    disabled_rules: list[str] = Field(default_factory=list)


@cache
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def normalize(text: str) -> str:
    """NFKC, casefold, traditional → simplified, zero-width characters removed."""
    text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH).casefold()
    return _t2s().convert(text)


def compact_view(normalized: str) -> str:
    return _SEPARATORS.sub("", normalized)


def _joined(run: list[str]) -> list[str]:
    """A run of single letters as words: joined, and joined without a leading English one-letter
    word (``a g u n`` → ``agun`` and ``gun``)."""
    out = ["".join(run)]
    if len(run) > 2 and run[0] in ("a", "i"):
        out.append("".join(run[1:]))
    return out


def words_view(normalized: str) -> str:
    """`` w1 w2 `` with runs of single-character words joined (``g u n`` → ``gun``)."""
    words: list[str] = []
    run: list[str] = []
    for token in _SEPARATORS.split(normalized):
        if len(token) == 1:
            run.append(token)
            continue
        if run:
            words += _joined(run)
            run = []
        if token:
            words.append(token)
    if run:
        words += _joined(run)
    return " " + " ".join(words) + " "


@dataclass(frozen=True)
class Match:
    rule_id: str


class ContentPolicy:
    """One compiled policy (the shared default, or the default with a tenant's changes)."""

    def __init__(self, rules: Iterable[PolicyRule]) -> None:
        import ahocorasick

        self.rules = list(rules)
        self._compact = ahocorasick.Automaton()
        self._words = ahocorasick.Automaton()
        for rule in self.rules:
            for term in rule.terms:
                norm = compact_view(normalize(term))
                if not norm:
                    continue
                latin = bool(_LATIN.match(norm))
                if not latin or len(norm) >= COMPACT_MIN_LATIN:
                    self._compact.add_word(norm, rule.id)
                if latin:
                    self._words.add_word(f" {norm} ", rule.id)
        for automaton in (self._compact, self._words):
            if len(automaton):
                automaton.make_automaton()

    @property
    def size(self) -> int:
        return len(self._compact) + len(self._words)

    def match(self, text: str) -> Match | None:
        if not text:
            return None
        normalized = normalize(text)
        for automaton, view in ((self._compact, compact_view), (self._words, words_view)):
            if len(automaton):
                for _, rule_id in automaton.iter(view(normalized)):
                    return Match(rule_id)
        return None

    def check(self, *texts: str, param: str = "prompt") -> None:
        for text in texts:
            hit = self.match(text)
            if hit is not None:
                raise PolicyViolation(
                    f"the request was blocked by content policy rule {hit.rule_id}", param=param, choices=None
                )


def load_policy_spec(path: Path | None = None) -> PolicySpec:
    """``path`` (``tenancy.policy_file``), else the policy packaged with the platform. A file that
    is named but missing is refused: running without the policy it meant would be silent."""
    from zimage_platform.defaults import policy_file

    if path is None:
        text = policy_file().read_text()
    elif path.is_file():
        text = path.read_text()
    else:
        raise InvalidRequest(
            f"the content policy file {path} (tenancy.policy_file) does not exist; "
            "leave tenancy.policy_file unset to use the policy packaged with the platform",
            code="policy_file_missing",
            param="tenancy.policy_file",
        )
    return PolicySpec.model_validate(yaml.safe_load(text) or {})


class PolicyRegistry:
    """The shared default policy plus each tenant's compiled variant (cached per tenant spec)."""

    def __init__(self, default: PolicySpec) -> None:
        self.default = default
        self._shared = ContentPolicy(default.rules)
        self._per_tenant: dict[str, tuple[TenantPolicy, ContentPolicy]] = {}

    def for_tenant(self, tenant_id: str, changes: TenantPolicy | None) -> ContentPolicy:
        if changes is None or (not changes.extra_rules and not changes.disabled_rules):
            return self._shared
        cached = self._per_tenant.get(tenant_id)
        if cached is not None and cached[0] == changes:
            return cached[1]
        rules = [r for r in self.default.rules if r.id not in changes.disabled_rules] + changes.extra_rules
        policy = ContentPolicy(rules)
        self._per_tenant[tenant_id] = (changes, policy)
        return policy
