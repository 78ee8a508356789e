"""The argument parser every `p2pllm` command uses: argparse, but a mistyped flag is named as such.

Plain argparse checks required options before unknown ones, so `p2pllm run --modle x` said that
--model is missing; here an unknown flag is reported first, with the closest real one.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys


class Parser(argparse.ArgumentParser):
    argv: list[str] = []  # the command line being parsed (set by parse_args; read by subcommand parsers)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        Parser.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        unknown = self._unknown_flags()
        if unknown and not message.startswith("unrecognized arguments"):
            message = f"unrecognized arguments: {' '.join(unknown)}"
        if unknown:
            flag = unknown[0].split("=", 1)[0]
            known = self._known_flags()
            close = ([k for k in known if k.startswith("-" + flag)][:1] if len(flag) == 2  # -m: --model
                     else difflib.get_close_matches(flag, known, n=1, cutoff=0.6))
            if close:
                message += f" (did you mean {close[0]}?)"
        super().error(message)

    def _known_flags(self) -> list[str]:
        known = list(self._option_string_actions)
        for action in self._actions:  # on the top-level parser, the chosen subcommand's flags count too
            if isinstance(action, argparse._SubParsersAction):
                chosen = next((t for t in Parser.argv if t in action.choices), None)
                if chosen:
                    known += list(action.choices[chosen]._option_string_actions)
        return known

    def _unknown_flags(self) -> list[str]:
        known = self._known_flags()
        flags = [t for t in Parser.argv if (t.startswith("--") and len(t) > 2) or re.fullmatch(r"-[A-Za-z]", t)]
        # argparse accepts unambiguous prefixes (--max for --max-tokens), so those are not unknown
        return [t for t in flags if not any(k.startswith(t.split("=", 1)[0]) for k in known)]
