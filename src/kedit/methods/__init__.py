"""Editing methods. Importing this package registers every built-in method (one ``register_method`` call each).

Use :func:`kedit.methods.registry.get_method` / :func:`list_methods` to look them up.
"""

from kedit.methods import rome  # noqa: F401  (registers "rome" and "r-rome")
from kedit.methods.registry import MethodSpec, get_method, list_methods, register_method

__all__ = ["MethodSpec", "get_method", "list_methods", "register_method"]
