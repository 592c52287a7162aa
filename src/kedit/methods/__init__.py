"""Editing methods. Importing this package registers every built-in method (one ``register_method`` call each).

Use :func:`kedit.methods.registry.get_method` / :func:`list_methods` to look them up.
"""

from kedit.methods import (
    alphaedit,  # noqa: F401  (registers "alphaedit" and "alphaedit-blue")
    emmet,  # noqa: F401  (registers "emmet")
    ft,  # noqa: F401  (registers "ft-l" and "ft-m")
    grace,  # noqa: F401  (registers "grace")
    kn,  # noqa: F401  (registers "kn")
    lora,  # noqa: F401  (registers "lora"; needs the optional peft at compute time)
    memit,  # noqa: F401  (registers "memit" and "memit-blue")
    pmet,  # noqa: F401  (registers "pmet" and "pmet-blue")
    rls,  # noqa: F401  (registers "rls")
    rome,  # noqa: F401  (registers "rome" and "r-rome")
    ultraedit,  # noqa: F401  (registers "ultraedit")
    wise,  # noqa: F401  (registers "wise")
)
from kedit.methods.registry import MethodSpec, get_method, list_methods, register_method

__all__ = ["MethodSpec", "get_method", "list_methods", "register_method"]
