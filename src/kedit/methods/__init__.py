"""Editing methods. Importing this package registers every built-in method (one ``register_method`` call each).

Use :func:`kedit.methods.registry.get_method` / :func:`list_methods` to look them up.
"""

from kedit.methods import rome  # noqa: F401  (registers "rome" and "r-rome")
from kedit.methods import ft  # noqa: F401  (registers "ft-l" and "ft-m")
from kedit.methods import lora  # noqa: F401  (registers "lora"; needs the optional peft at compute time)
from kedit.methods import kn  # noqa: F401  (registers "kn")
from kedit.methods import memit  # noqa: F401  (registers "memit" and "memit-blue")
from kedit.methods import pmet  # noqa: F401  (registers "pmet" and "pmet-blue")
from kedit.methods import alphaedit  # noqa: F401  (registers "alphaedit" and "alphaedit-blue")
from kedit.methods import emmet  # noqa: F401  (registers "emmet")
from kedit.methods.registry import MethodSpec, get_method, list_methods, register_method

__all__ = ["MethodSpec", "get_method", "list_methods", "register_method"]
