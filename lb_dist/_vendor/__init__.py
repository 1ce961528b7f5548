"""The one place lb_dist reads engines' private internals (DeepSpeed, Horovod, torch).

Each engine has one small module here (:mod:`lb_dist._vendor.deepspeed`, :mod:`~lb_dist._vendor.horovod`,
:mod:`~lb_dist._vendor.torch`); every private attribute, private class or patch of a live object that
lb_dist relies on is read or done there, and nowhere else in the package. Modules that read internals
whose meaning can change between releases check the installed version against the range the project
tests (:func:`check_version`) before they are used, and refuse any other release with an error naming
the range and the environment variable that turns the error into a warning.
"""
from __future__ import annotations

import os
import warnings

__all__ = ["check_version", "untested_allowed"]


def untested_allowed(env_var: str) -> bool:
    """True when the environment variable ``env_var`` is ``1``/``true``/``yes``."""
    return os.environ.get(env_var, "").strip().lower() in ("1", "true", "yes")


def check_version(user: str, name: str, package: str, version: str, specifier: str, env_var: str,
                  reads: str) -> str:
    """Refuse ``package`` (display name ``name``) at ``version`` outside ``specifier`` (a pip specifier,
    e.g. ``">=0.19.8,<0.20"``) with a RuntimeError naming the range and ``env_var`` (``env_var=1``: a
    RuntimeWarning instead). ``user`` is the lb_dist module that needs it, ``reads`` what it reads of the
    package (for the message). Returns ``version``.

    An error rather than a warning: a release that renames an internal fails loudly, but one that
    changes its meaning would train wrongly without a word."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
    try:
        ok = Version(str(version).split("+")[0]) in SpecifierSet(specifier)
    except InvalidVersion:
        ok = False
    if ok:
        return version
    message = (f"{user} supports {name} {specifier} (it reads {reads}) and found {package} {version}: "
               f"install '{package}{specifier}', or set {env_var}=1 to try this release anyway")
    if untested_allowed(env_var):
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return version
    raise RuntimeError(message)
