"""The one error type users see: ``UserError``.

An error the user caused and can fix (a bad flag, a missing file, a model that does not fit) is
raised as ``UserError`` anywhere in the library; the commands (``afm_mlx.core.config.run_main``) turn it into
one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user caused and can fix: reported as one line, never a traceback."""
