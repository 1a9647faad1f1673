"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except empty / None ones (their help text explains them)."""

    def _get_help_string(self, action):
        if action.default in (None, "", False):
            return action.help
        return super()._get_help_string(action)
