"""lb_dist state that travels inside a plain ``optimizer.state_dict()``.

``GradientMix.attach(optimizer)`` and a CLARS built with ``moments=MicroBatchMoments(...)`` link their
object to the optimizer here. torch's optimizer state-dict hooks then make ``optimizer.state_dict()``
carry, under one namespaced top-level key::

    state_dict["lb_dist"] = {"gradient_mix": mix.state_dict(), "moments": estimator.state_dict()}

and ``optimizer.load_state_dict(sd)`` restore them, so that a user's ordinary checkpoint (what
``torch.save(opt.state_dict())`` writes, under any engine whose checkpoint goes through the
optimizer's ``state_dict``) resumes the mixing coefficients and the estimator exactly.

Loading rules (docs/gradientmix.md, "Checkpoints"):

* the section names exactly the linked objects: loaded after torch has loaded the optimizer;
* the section names other objects (a mix in the checkpoint and none linked now, or the reverse):
  ``ValueError`` naming them, before anything is loaded;
* no section at all (a state_dict saved by torch, another tool or an older lb_dist): a
  ``UserWarning`` naming the objects that keep their current state.
"""
from __future__ import annotations

import warnings
from typing import Mapping

KEY = "lb_dist"
_ATTR = "_lb_dist_linked_state"


class _Links:
    """The objects linked to one optimizer (kept as ``optimizer._lb_dist_linked_state``)."""

    def __init__(self) -> None:
        self.objects: dict[str, object] = {}
        self.pending: Mapping | None = None
        self.handles: list = []


def _links(optimizer):
    return optimizer.__dict__.get(_ATTR)


def link(optimizer, name: str, obj) -> None:
    """Carry ``obj.state_dict()`` in ``optimizer.state_dict()[KEY][name]`` and restore it on load."""
    links = _links(optimizer)
    if links is None:
        links = _Links()
        optimizer.__dict__[_ATTR] = links
    if not links.handles:
        links.handles = [optimizer.register_state_dict_post_hook(_save),
                         optimizer.register_load_state_dict_pre_hook(_check),
                         optimizer.register_load_state_dict_post_hook(_load)]
    current = links.objects.get(name)
    if current is not None and current is not obj:
        raise ValueError(f"this optimizer's state_dict already carries another {name!r} "
                         f"(state_dict()[{KEY!r}][{name!r}]); one optimizer carries one {name}")
    links.objects[name] = obj


def unlink(optimizer, name: str, obj) -> None:
    """Undo :func:`link` (nothing if ``obj`` is not the linked one)."""
    links = _links(optimizer)
    if links is not None and links.objects.get(name) is obj:
        del links.objects[name]


def linked(optimizer) -> dict:
    """``{name: object}`` linked to ``optimizer`` (empty if none)."""
    links = _links(optimizer)
    return {} if links is None else dict(links.objects)


def _save(optimizer, state_dict):
    links = _links(optimizer)
    if links is not None and links.objects:
        state_dict[KEY] = {name: obj.state_dict() for name, obj in links.objects.items()}
    return None


def _validated(links, section, where: str) -> Mapping:
    """``section`` if it names exactly the linked objects, else ValueError naming the difference."""
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}: state_dict[{KEY!r}] must be a dict of states, got {type(section).__name__}")
    names = sorted(links.objects) if links is not None else []
    missing = [n for n in names if n not in section]
    extra = sorted(n for n in section if n not in names)
    if missing or extra:
        what = "; ".join(part for part in (
            f"linked to this optimizer but absent from the checkpoint: {missing}" if missing else "",
            f"in the checkpoint but not linked to this optimizer: {extra}" if extra else "") if part)
        raise ValueError(f"{where}: state_dict[{KEY!r}] does not match this optimizer ({what}); build the "
                         f"optimizer with the same GradientMix (attach) and CLARS moments as the run that saved "
                         f"it, or detach them / drop state_dict[{KEY!r}] on purpose before loading")
    return section


def load_section(optimizer, section, where: str) -> None:
    """Load an ``"lb_dist"`` section into the objects linked to ``optimizer`` (validated first)."""
    links = _links(optimizer)
    _validated(links, section, where)
    for name, obj in (links.objects.items() if links is not None else ()):
        obj.load_state_dict(section[name])


def _check(optimizer, state_dict):
    links = _links(optimizer)
    if links is None:
        return None
    links.pending = None
    section = state_dict.get(KEY)
    if section is None:
        if links.objects:
            warnings.warn(f"optimizer.load_state_dict: the state_dict has no {KEY!r} section (saved by torch, "
                          f"another tool or an lb_dist without it), so {sorted(links.objects)} keep their current "
                          f"state instead of the checkpoint's (e.g. the GradientMix step); restore them with "
                          f"their own load_state_dict if the checkpoint has them elsewhere", UserWarning,
                          stacklevel=4)
        return None
    links.pending = _validated(links, section, "optimizer.load_state_dict")
    return None


def _load(optimizer) -> None:
    links = _links(optimizer)
    if links is None or links.pending is None:
        return
    section, links.pending = links.pending, None
    for name, obj in links.objects.items():
        obj.load_state_dict(section[name])
