"""Prompt templates: `{content}` is the document (or one piece of it), `{filename}` its name.

Only those two placeholders are replaced, so a template may contain other braces (a JSON example,
code) without escaping them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

_PLACEHOLDER = re.compile(r"\{(content|filename)\}")


@dataclass(frozen=True)
class Template:
    name: str  # "research/methodology", or "prompt-1" for the N-th --prompt
    text: str

    def render(self, content: str, filename: str) -> str:
        # one pass: a document that itself contains "{filename}" is not substituted into
        values = {"content": content, "filename": filename}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)


PRESETS: dict[str, dict[str, str]] = {
    "research": {
        "question": "Read the research paper {filename} below. What research question or problem does it address, "
                    "and why does it matter? Answer in a short paragraph.\n\n{content}",
        "methodology": "Read the research paper {filename} below. Describe its methodology: the approach, data, "
                       "experimental setup and how results are evaluated.\n\n{content}",
        "findings": "Read the research paper {filename} below. List its key findings and results, with the numbers "
                    "it reports where it gives them.\n\n{content}",
        "limitations": "Read the research paper {filename} below. What are its limitations: assumptions, threats to "
                       "validity, what it does not show?\n\n{content}",
        "future-work": "Read the research paper {filename} below. What future work does it propose or suggest, and "
                       "what open questions remain?\n\n{content}",
    },
    "summary": {
        "summary": "Summarize the document {filename} below in one paragraph.\n\n{content}",
        "key-points": "List the key points of the document {filename} below as short bullet points.\n\n{content}",
        "tldr": "Give a one-sentence TL;DR of the document {filename} below.\n\n{content}",
    },
    "critical": {
        "strengths": "Critically read the document {filename} below. What are its main strengths: what is argued or "
                     "shown convincingly, and why?\n\n{content}",
        "weaknesses": "Critically read the document {filename} below. What are its weaknesses: gaps in the argument, "
                      "unsupported claims, missing evidence?\n\n{content}",
        "assumptions": "Critically read the document {filename} below. Which assumptions does it rely on, stated or "
                       "not, and how reasonable are they?\n\n{content}",
        "questions": "Critically read the document {filename} below. Which questions would you ask its author, and "
                     "what would it take to convince a skeptical reader?\n\n{content}",
    },
}

DEFAULT_PRESET = "summary"


def templates(presets: list[str], prompts: list[str]) -> list[Template]:
    """The templates of the given presets, then the --prompt ones; the default preset when neither."""
    for i, text in enumerate(prompts, 1):
        if "{content}" not in text:
            raise UsageError(f"--prompt #{i} has no {{content}} placeholder, so the document would never reach the "
                             f"model: {_short(text)!r}")
    chosen = presets or ([] if prompts else [DEFAULT_PRESET])
    out = [Template(f"{preset}/{name}", text) for preset in dict.fromkeys(chosen)
           for name, text in PRESETS[preset].items()]
    out += [Template(f"prompt-{i}", text) for i, text in enumerate(prompts, 1)]
    seen: set[str] = set()
    unique = []
    for t in out:  # the same template twice would be the same task twice
        if t.text not in seen:
            seen.add(t.text)
            unique.append(t)
    return unique


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
