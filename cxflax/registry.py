"""Things looked up by the name a config gives (models, heads, losses, schedules, tasks, dataset
layouts, preprocessing ops): each kind has one Registry, filled by a decorator where the thing is
defined, so that adding one is adding a module or a function, never editing a list or a chain."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Names → objects of one kind. `get` of an unknown name raises `error` (ValueError, or a
  CxflaxError subclass where the name comes from a config) listing the known names."""

  def __init__(self, kind: str, error: type[Exception] = ValueError, where: str = ""):
    self.kind, self.error, self.where = kind, error, where
    self._items: dict[str, T] = {}
    self._info: dict[str, dict] = {}

  def register(self, name: str, **info) -> Callable[[T], T]:
    """Decorator: `@REGISTRY.register('name')` above the function or class; `info` is what the
    thing tells about itself (e.g. fields=('beta',): the config fields a loss reads)."""
    def add(obj: T) -> T:
      self.add(name, obj, **info)
      return obj
    return add

  def info(self, name: str) -> dict:
    self.get(name)  # an unknown name raises the registry's error
    return dict(self._info.get(name, {}))

  def add(self, name: str, obj: T, **info) -> None:
    if name in self._items:  # two under one name would silently shadow each other
      modules = [getattr(o, "__module__", None) for o in (self._items[name], obj)]
      where = f" ({modules[0]} and {modules[1]})" if all(modules) else ""
      raise ValueError(f"{self.kind} {name!r} is registered twice{where}")
    self._items[name] = obj
    self._info[name] = info

  def get(self, name: str) -> T:
    if name not in self._items:
      where = f"{self.where}: " if self.where else ""
      raise self.error(f"{where}unknown {self.kind} {name!r}; use one of {', '.join(self.names())}")
    return self._items[name]

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name) -> bool:
    return name in self._items
