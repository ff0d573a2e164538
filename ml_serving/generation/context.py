"""Context assembly: a request's typed tip signals become a validated, sanitised PromptContext."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from ml_serving.errors import InvalidArgument

logger = logging.getLogger(__name__)

# Caps on user-supplied text, in characters after sanitisation. Long enough for a real goal or
# note typed on a phone, short enough that user text cannot crowd the instructions out of the
# prompt or run up token bills. Over-long text is truncated, never rejected.
MAX_TOPIC_CHARS: Final = 40
MAX_GOAL_CHARS: Final = 280
MAX_NOTE_CHARS: Final = 500
MAX_INTEREST_CHARS: Final = 40
MAX_INTERESTS: Final = 10
MAX_RECENT_TIP_CHARS: Final = 200
MAX_RECENT_TIPS: Final = 5

# Limits that reject rather than truncate: these values are identifiers or numbers, where a
# silently altered value would be wrong rather than merely shorter.
MAX_ID_CHARS: Final = 128
"""The one bound on identifiers, in every RPC: user ids (Score's too) and request ids."""
MAX_USER_ID_CHARS: Final = MAX_ID_CHARS
MAX_STREAK_DAYS: Final = 36_500  # a century of daily streaks: anything above is a client bug
MAX_LOCALE_CHARS: Final = 35  # RFC 5646 section 4.4.1: the buffer size every tag fits in

EXPERIENCE_LEVELS: Final = ("", "beginner", "intermediate", "advanced")
"""Accepted experience levels; "" means unspecified (the prompt then assumes a beginner)."""

DEFAULT_LOCALE: Final = "en"
"""The reply language when the request names no locale (the proto documents "empty = English")."""

DATA_OPEN: Final = "<user_data>"
"""The line that opens the quoted user-data block in a prompt."""

DATA_CLOSE: Final = "</user_data>"
"""The line that closes the quoted user-data block; user text can never contain it literally."""

DATA_FIELDS: Final = ("topic", "goal", "note", "interests", "recent_tips")
"""The keys of the JSON object inside the data block, in the order they are written."""

UNSET_EXPERIENCE_LABEL: Final = "not given (assume a beginner)"
"""How an unspecified experience level reads in the prompt (the proto's documented meaning)."""

# Characters that could pass for the brackets of the data-block delimiters. Quoting escapes
# them so that no user text can spell a closing tag, even a visually similar one. "«" and "»"
# are left alone: they are ordinary quotation marks in many locales.
_DELIMITER_LOOKALIKES: Final = frozenset(
    "<>"
    "\u02c2\u02c3"  # modifier letter left/right arrowhead
    "\u1438\u1433"  # Canadian syllabics pa/po
    "\u2039\u203a"  # single angle quotation marks
    "\u2329\u232a"  # angle brackets
    "\u27e8\u27e9"  # mathematical angle brackets
    "\u276e\u276f"  # heavy angle quotation ornaments
    "\u29fc\u29fd"  # curved angle brackets
    "\u3008\u3009"  # CJK angle brackets
    "\ufe64\ufe65"  # small less/greater-than
    "\uff1c\uff1e"  # fullwidth less/greater-than
)

# Categories quoting writes as visible \uXXXX escapes rather than raw: controls, format
# characters (bidi overrides, zero-width, tag characters), surrogates, private use, and line or
# paragraph separators, which some renderers treat as newlines.
_ESCAPED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})

# Categories sanitisation deletes. Cs and Co go too: a lone surrogate cannot be encoded for the
# provider, and private-use code points carry no meaning a model could use.
_REMOVED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co"})

# Raw input is cut to this multiple of a field's cap before sanitising, so that a multi-megabyte
# field costs bounded work; sanitising only shrinks text, so nothing that could survive the cap
# is lost except behind an absurd run of invisible characters.
_RAW_SLACK: Final = 8
# Lists are scanned this far for usable (non-empty, distinct) entries before giving up.
_MAX_SCANNED_ITEMS: Final = 100

_LOCALE_RE: Final = re.compile(
    r"""
    [a-z]{2,3}(?:-[a-z]{3}){0,3}          # language, optional extended language subtags
    (?:-[a-z]{4})?                        # script
    (?:-(?:[a-z]{2}|[0-9]{3}))?           # region
    (?:-(?:[a-z0-9]{5,8}|[0-9][a-z0-9]{3}))*  # variants
    (?:-[0-9a-wy-z](?:-[a-z0-9]{2,8})+)*  # extensions
    (?:-x(?:-[a-z0-9]{1,8})+)?            # private use
    """,
    re.VERBOSE | re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class TipSignals:
    """The raw signals of one Generate request: the proto ``TipContext`` plus the user id.

    Values arrive as the client sent them; :func:`assemble_context` validates and sanitises.
    """

    user_id: str
    topic: str = ""
    goal: str = ""
    note: str = ""
    interests: tuple[str, ...] = ()
    experience_level: str = ""
    streak_days: int = 0
    recent_tips: tuple[str, ...] = ()
    locale: str = ""


@dataclass(frozen=True, slots=True)
class PromptContext:
    """Validated, sanitised signals, ready to be rendered into a prompt.

    Free-text fields hold sanitised user text; they reach a prompt only through
    :meth:`data_block`, which quotes them as data. ``truncated`` names (by proto field path)
    every field that was shortened or had entries dropped, for logs and metrics.
    """

    user_id: str
    topic: str = ""
    goal: str = ""
    note: str = ""
    interests: tuple[str, ...] = ()
    experience_level: str = ""
    streak_days: int = 0
    recent_tips: tuple[str, ...] = ()
    locale: str = ""
    truncated: tuple[str, ...] = ()

    @property
    def is_thin(self) -> bool:
        """True when there is nothing personal to work from: no goal, no note, no interests."""
        return not (self.goal or self.note or self.interests)

    @property
    def reply_locale(self) -> str:
        """The locale the tip is written for: the request's, else :data:`DEFAULT_LOCALE`."""
        return self.locale or DEFAULT_LOCALE

    @property
    def experience_label(self) -> str:
        """The experience level as the prompt states it."""
        return self.experience_level or UNSET_EXPERIENCE_LABEL

    def data_fields(self) -> dict[str, str | list[str]]:
        """The user-supplied fields, keyed as in the data block (:data:`DATA_FIELDS`)."""
        return {
            "topic": self.topic,
            "goal": self.goal,
            "note": self.note,
            "interests": list(self.interests),
            "recent_tips": list(self.recent_tips),
        }

    def data_block(self) -> str:
        """The user-supplied fields as a delimited block holding one quoted JSON object.

        Every value goes through :func:`quote_user_text`, so the block between
        :data:`DATA_OPEN` and :data:`DATA_CLOSE` is valid JSON whose strings cannot close the
        block, start a new line or carry invisible characters.
        """
        lines = [DATA_OPEN, "{"]
        fields = self.data_fields()
        for index, key in enumerate(DATA_FIELDS):
            value = fields[key]
            if isinstance(value, str):
                encoded = quote_user_text(value)
            else:
                encoded = "[" + ", ".join(quote_user_text(item) for item in value) + "]"
            separator = "," if index < len(DATA_FIELDS) - 1 else ""
            lines.append(f'  "{key}": {encoded}{separator}')
        lines.extend(["}", DATA_CLOSE])
        return "\n".join(lines)


RENDER_SPEC: Final[Mapping[str, object]] = {
    "data_open": DATA_OPEN,
    "data_close": DATA_CLOSE,
    "data_fields": list(DATA_FIELDS),
    "default_locale": DEFAULT_LOCALE,
    "unset_experience": UNSET_EXPERIENCE_LABEL,
    "escaped_lookalikes": "".join(sorted(_DELIMITER_LOOKALIKES)),
    "escaped_categories": sorted(_ESCAPED_CATEGORIES),
    "caps": {
        "topic": MAX_TOPIC_CHARS,
        "goal": MAX_GOAL_CHARS,
        "note": MAX_NOTE_CHARS,
        "interest": MAX_INTEREST_CHARS,
        "interests": MAX_INTERESTS,
        "recent_tip": MAX_RECENT_TIP_CHARS,
        "recent_tips": MAX_RECENT_TIPS,
    },
}
"""Every constant of this module that shapes the text a model sees.

The prompt registry hashes it with each template, so a change here (a new delimiter, a new
cap) changes every content hash and cannot slip past the published-version lock.
"""


def quote_user_text(text: str) -> str:
    """Encode ``text`` as a JSON string literal that is safe to place inside the data block.

    The result parses back to ``text`` with ``json.loads``. It contains no raw newline, control,
    format (bidi, zero-width, tag) or separator character and no angle bracket or look-alike of
    one: those are written as ``\\uXXXX`` escapes, so the text can neither end the quoting, spell
    the closing delimiter, start a line of its own, nor hide characters from a reviewer.
    """
    encoded = json.dumps(text, ensure_ascii=False)
    if encoded.isascii() and encoded.isprintable():
        # The common case, in C: printable ASCII holds none of the escaped categories, and of
        # the look-alikes only the angle brackets themselves (what the loop below writes).
        if "<" in encoded or ">" in encoded:
            encoded = encoded.replace("<", _LT).replace(">", _GT)
        return encoded
    return _quote_each(encoded)


_LT: Final = "\\u003c"
_GT: Final = "\\u003e"


def _quote_each(encoded: str) -> str:
    """quote_user_text's escaping, character by character (any text)."""
    out: list[str] = []
    for char in encoded:
        if char in _DELIMITER_LOOKALIKES or unicodedata.category(char) in _ESCAPED_CATEGORIES:
            out.append(_json_escape(char))
        else:
            out.append(char)
    return "".join(out)


def sanitize_text(text: str, max_chars: int) -> tuple[str, bool]:
    """Clean one piece of user text; return it and whether it had to be truncated.

    NFKC folds compatibility forms (fullwidth letters and brackets) into their plain forms;
    every whitespace run, newlines and tabs included, becomes one space; control, format
    (bidi overrides, zero-width, tag characters), surrogate and private-use characters are
    removed; the result is trimmed and capped at ``max_chars``, ending in "…" when cut.
    """
    raw = text[: max_chars * _RAW_SLACK]
    if raw.isascii() and raw.isprintable():
        # The common case, in C: NFKC leaves ASCII as it is and printable ASCII has nothing to
        # remove, so only the whitespace runs are left to fold (what _clean_each gives too).
        cleaned = " ".join(raw.split())
    else:
        cleaned = _clean_each(raw)
    cut = len(raw) < len(text)
    if len(cleaned) > max_chars:
        return _truncate(cleaned, max_chars), True
    return cleaned, cut


def _clean_each(raw: str) -> str:
    """sanitize_text's cleaning, character by character (any text), before the cap."""
    folded = unicodedata.normalize("NFKC", raw)
    kept: list[str] = []
    for char in folded:
        if char.isspace():
            # Before the category check: tabs and newlines are Cc but mean "space" here.
            kept.append(" ")
        elif unicodedata.category(char) not in _REMOVED_CATEGORIES:
            kept.append(char)
    return " ".join("".join(kept).split())


def assemble_context(signals: TipSignals) -> PromptContext:
    """Validate and sanitise ``signals`` into a :class:`PromptContext`.

    Over-long text and lists are truncated; values that are clearly wrong raise
    :class:`~ml_serving.errors.InvalidArgument` naming the proto field path.
    """
    user_id = _validate_user_id(signals.user_id)
    truncated: list[str] = []

    topic, cut = sanitize_text(signals.topic, MAX_TOPIC_CHARS)
    # Topics are category labels: one case so "Sleep" and "sleep" pick the same fallback tip.
    topic = topic.casefold()
    if cut:
        truncated.append("context.topic")
    goal, cut = sanitize_text(signals.goal, MAX_GOAL_CHARS)
    if cut:
        truncated.append("context.goal")
    note, cut = sanitize_text(signals.note, MAX_NOTE_CHARS)
    if cut:
        truncated.append("context.note")
    interests = _sanitize_list(
        signals.interests,
        "context.interests",
        MAX_INTEREST_CHARS,
        MAX_INTERESTS,
        truncated,
        dedupe=True,
    )
    experience_level = _validate_experience_level(signals.experience_level)
    streak_days = _validate_streak_days(signals.streak_days)
    recent_tips = _sanitize_list(
        signals.recent_tips,
        "context.recent_tips",
        MAX_RECENT_TIP_CHARS,
        MAX_RECENT_TIPS,
        truncated,
        dedupe=False,
    )
    locale = _validate_locale(signals.locale)

    context = PromptContext(
        user_id=user_id,
        topic=topic,
        goal=goal,
        note=note,
        interests=interests,
        experience_level=experience_level,
        streak_days=streak_days,
        recent_tips=recent_tips,
        locale=locale,
        truncated=tuple(truncated),
    )
    if truncated:
        logger.debug("truncated user text in fields %s", ", ".join(truncated))
    return context


def _validate_user_id(user_id: str) -> str:
    if not user_id.strip():
        raise InvalidArgument("user_id", "required: the id of the user the tip is for")
    check_id("user_id", user_id)
    return user_id


def check_id(field: str, value: str) -> None:
    """Refuse an identifier over MAX_ID_CHARS or with control or invisible characters
    (INVALID_ARGUMENT naming `field`): an id cut short would name someone else."""
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(field, f"too long: {len(value)} characters, at most {MAX_ID_CHARS}")
    if value.isascii() and value.isprintable():
        return  # printable ASCII has none of the removed categories: no per-character look
    if any(unicodedata.category(char) in _REMOVED_CATEGORIES for char in value):
        raise InvalidArgument(field, "must not contain control or invisible characters")


def _validate_experience_level(level: str) -> str:
    normalised = level.strip().casefold()
    if normalised not in EXPERIENCE_LEVELS:
        raise InvalidArgument(
            "context.experience_level",
            "must be one of beginner, intermediate, advanced, or empty for unspecified",
        )
    return normalised


def _validate_streak_days(streak_days: int) -> int:
    if isinstance(streak_days, bool) or not isinstance(streak_days, int):
        raise InvalidArgument("context.streak_days", "must be a whole number of days")
    if streak_days < 0:
        raise InvalidArgument("context.streak_days", f"must not be negative, got {streak_days}")
    if streak_days > MAX_STREAK_DAYS:
        raise InvalidArgument(
            "context.streak_days", f"implausibly large: {streak_days}, at most {MAX_STREAK_DAYS}"
        )
    return streak_days


def _validate_locale(locale: str) -> str:
    tag = locale.strip()
    if not tag:
        return ""
    # POSIX-style "en_GB" is what many platforms hand out; accept it as the BCP 47 "en-GB".
    tag = tag.replace("_", "-")
    if len(tag) > MAX_LOCALE_CHARS or not _LOCALE_RE.fullmatch(tag):
        raise InvalidArgument(
            "context.locale", 'must be a BCP 47 language tag such as "en-GB", or empty'
        )
    return _canonical_locale(tag)


def _canonical_locale(tag: str) -> str:
    """Apply BCP 47 case conventions: language lower, Script title, REGION upper."""
    parts = tag.split("-")
    out = [parts[0].lower()]
    in_extension = False
    for part in parts[1:]:
        if len(part) == 1:
            in_extension = True  # after a singleton everything is extension or private use
        if in_extension:
            out.append(part.lower())
        elif len(part) == 4 and part.isalpha():
            out.append(part.title())
        elif len(part) == 2 and part.isalpha():
            out.append(part.upper())
        else:
            out.append(part.lower())
    return "-".join(out)


def _sanitize_list(
    items: Iterable[str],
    path: str,
    max_chars: int,
    max_items: int,
    truncated: list[str],
    *,
    dedupe: bool,
) -> tuple[str, ...]:
    kept: list[str] = []
    seen: set[str] = set()
    dropped = False
    for index, item in enumerate(items):
        if index >= _MAX_SCANNED_ITEMS:
            dropped = True
            break
        cleaned, cut = sanitize_text(item, max_chars)
        if not cleaned:
            continue
        key = cleaned.casefold()
        if dedupe and key in seen:
            continue
        if len(kept) == max_items:
            dropped = True
            break
        seen.add(key)
        kept.append(cleaned)
        if cut:
            truncated.append(f"{path}[{index}]")
    if dropped:
        truncated.append(path)
    return tuple(kept)


def _truncate(text: str, max_chars: int) -> str:
    """Cut ``text`` to ``max_chars`` including a closing "…", at a word break when one is near."""
    head = text[: max_chars - 1]
    space = head.rfind(" ")
    # Break at a word only if that keeps most of the allowance; one long word is cut mid-word.
    if space >= (max_chars * 4) // 5:
        head = head[:space]
    return head.rstrip() + "…"


def _json_escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    # JSON has no escape above the BMP: write the UTF-16 surrogate pair, which json.loads joins.
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def with_profile(signals: TipSignals, profile: Mapping[str, object]) -> TipSignals:
    """``signals`` with the fields the request left empty taken from the user-profile view
    (the feature store). A value sent wins; a stored value of the wrong shape is skipped, so a
    bad row can never fail the call (the store's values are sanitised like a request's)."""

    def strings(value: object) -> tuple[str, ...]:
        if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            return value
        return ()

    def valid(value: object, check: Callable[[str], object]) -> str:
        if not isinstance(value, str):
            return ""
        try:
            check(value)
        except InvalidArgument:
            return ""
        return value

    streak = profile.get("streak_days")
    return dataclasses.replace(
        signals,
        interests=signals.interests or strings(profile.get("interests")),
        experience_level=signals.experience_level
        or valid(profile.get("experience_level"), _validate_experience_level),
        streak_days=signals.streak_days
        or (int(streak) if isinstance(streak, float) and 0 <= streak <= MAX_STREAK_DAYS else 0),
        recent_tips=signals.recent_tips or strings(profile.get("recent_tips")),
        locale=signals.locale or valid(profile.get("locale"), _validate_locale),
    )


def profile_gaps(signals: TipSignals) -> bool:
    """True when a field the user-profile view can fill is empty in the request."""
    return not (
        signals.interests
        and signals.experience_level
        and signals.streak_days
        and signals.recent_tips
        and signals.locale
    )
