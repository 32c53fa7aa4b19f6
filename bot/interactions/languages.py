"""The languages the settings modal offers for "Translate message", and the user's Slack
locale as a first guess.

The stored value is the language's English name ("German"): it goes into the translation
prompt as it is ("Translate the user's message into German"), and it is what the free-text
field of earlier versions stored, so old rows keep working. Saved values that are not on
the list (typed into that old field, e.g. "British English") stay selectable.

There is no "auto" choice on purpose: the setting names the language to translate *into*,
so "the language you write in" would be a second, different feature.

Slack sends a user's locale only from `users.info` with `include_locale=true`, never in
interaction payloads; it is an IETF tag such as `de-DE`, `pt-BR`, `es-LA` or `zh-TW`.
"""

from __future__ import annotations

# (stored value, how the option reads). About twenty: Slack's own interface languages and
# the most used others. The menu must stay under Slack's 100 options.
LANGUAGES: tuple[tuple[str, str], ...] = (
    ("English", "English"),
    ("Spanish", "Spanish — Español"),
    ("French", "French — Français"),
    ("German", "German — Deutsch"),
    ("Portuguese", "Portuguese — Português"),
    ("Italian", "Italian — Italiano"),
    ("Dutch", "Dutch — Nederlands"),
    ("Polish", "Polish — Polski"),
    ("Swedish", "Swedish — Svenska"),
    ("Czech", "Czech — Čeština"),
    ("Russian", "Russian — Русский"),
    ("Ukrainian", "Ukrainian — Українська"),
    ("Turkish", "Turkish — Türkçe"),
    ("Arabic", "Arabic — العربية"),
    ("Hebrew", "Hebrew — עברית"),
    ("Hindi", "Hindi — हिन्दी"),
    ("Indonesian", "Indonesian — Bahasa Indonesia"),
    ("Vietnamese", "Vietnamese — Tiếng Việt"),
    ("Japanese", "Japanese — 日本語"),
    ("Korean", "Korean — 한국어"),
    ("Chinese (Simplified)", "Chinese, Simplified — 简体中文"),
    ("Chinese (Traditional)", "Chinese, Traditional — 繁體中文"),
)
NAMES = frozenset(name for name, _ in LANGUAGES)

# ISO 639-1 primary subtag -> stored value (Chinese is decided by the region or script).
_BY_CODE = {
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "de": "German",
    "pt": "Portuguese",
    "it": "Italian",
    "nl": "Dutch",
    "pl": "Polish",
    "sv": "Swedish",
    "cs": "Czech",
    "ru": "Russian",
    "uk": "Ukrainian",
    "tr": "Turkish",
    "ar": "Arabic",
    "he": "Hebrew",
    "iw": "Hebrew",  # the old code, still seen in some locales
    "hi": "Hindi",
    "id": "Indonesian",
    "vi": "Vietnamese",
    "ja": "Japanese",
    "ko": "Korean",
}
_TRADITIONAL = ("tw", "hk", "mo", "hant")


def language_for_locale(locale: object) -> str | None:
    """The listed language of a Slack locale (`de-DE` -> German), or None if not listed."""
    if not isinstance(locale, str) or not locale.strip():
        return None
    parts = locale.strip().lower().replace("_", "-").split("-")
    if parts[0] == "zh":
        return "Chinese (Traditional)" if any(p in _TRADITIONAL for p in parts[1:]) else "Chinese (Simplified)"
    return _BY_CODE.get(parts[0])


def canonical(language: str) -> str:
    """A listed language written another way ("german", "Deutsch") as its stored value;
    anything else unchanged."""
    folded = language.strip().casefold()
    for name, label in LANGUAGES:
        native = label.split(" — ", 1)[-1]
        if folded in (name.casefold(), native.casefold()):
            return name
    return language.strip()


def language_choices(current: str) -> list[tuple[str, str]]:
    """The menu: the listed languages, with a saved value that is not on the list first
    (so opening and saving the modal never changes it)."""
    choices = list(LANGUAGES)
    current = canonical(current) if current else ""
    if current and current not in NAMES:
        choices.insert(0, (current, current))
    return choices
