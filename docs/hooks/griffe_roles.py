"""A griffe extension: qbound's Sphinx-style roles in docstrings become checked cross-references.

qbound's docstrings write references the Sphinx way (``:func:`certify```, ``:class:`~qbound.box.Box```,
``:mod:`qbound.bounds.fp```). Markdown does not know these roles, so this extension, run by
mkdocstrings when it loads the package, rewrites each one before the docstring is rendered:

* a target inside qbound is resolved as Python would at run time (relative to the object, its
  class and its module first, through the modules' imports, so ``qbound.certify`` is the function
  the package exports, not the module of the same name) and becomes an optional autorefs link: a
  link where the reference renders that object, plain code where it does not;
* a target outside qbound (``jax.shard_map``, ``ValueError``) becomes plain code;
* a target that names nothing is reported as a warning, which ``mkdocs build --strict`` turns into
  an error: docstrings cannot point at names that no longer exist.

``~a.b.c`` shows ``c``, as in Sphinx.

It also makes the doctests render as code: ``Example:`` sections (Google style allows the singular)
become the ``Examples:`` sections griffe parses, and a ``>>>`` block outside such a section (a module
docstring's) is fenced as ``pycon``, where Markdown would otherwise read ``>>>`` as quotes.
"""

from __future__ import annotations

import builtins
import html
import logging
import re

import griffe

_log = logging.getLogger("mkdocs.plugins.qbound.griffe_roles")  # under "mkdocs": counts in --strict

ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|attr|data|exc|obj):`(~?)([A-Za-z_][\w.]*)`")
EXTERNAL = {"jax", "jnp", "np", "numpy", "scipy", "optax", "flax", "nnx", "onnx", "onnxruntime", "ml_dtypes",
            "math", "typing", "dataclasses", "functools"} | set(dir(builtins))


def _step(root: griffe.Module, path: str, depth: int = 0):
  """The object ``path`` (absolute, starting with the package name) names, or None."""
  if depth > 20:
    return None
  parts = path.split(".")
  if parts[0] != root.name:
    return None
  obj = root
  for i, part in enumerate(parts[1:], start=1):
    rest = ".".join(parts[i + 1:])
    member = obj.members.get(part) if hasattr(obj, "members") else None
    if rest and isinstance(member, griffe.Module):  # a.b.c: b is the submodule, as for imports
      obj = member
      continue
    imported = obj.imports.get(part) if isinstance(obj, griffe.Module) else None
    if imported is not None and imported != f"{obj.path}.{part}":  # what the name is at run time
      return _step(root, imported + (f".{rest}" if rest else ""), depth + 1)
    if member is None:
      return None
    if isinstance(member, griffe.Alias):
      target = member.target_path + (f".{rest}" if rest else "")
      return _step(root, target, depth + 1)
    obj = member
  return obj


def _fence_doctests(text: str) -> str:
  out, section, block = [], None, None  # section: indent of an Examples header; block: a fence's
  for line in text.split("\n"):
    stripped, indent = line.strip(), len(line) - len(line.lstrip())
    if block is not None and not stripped:
      out.append(" " * block + "```")
      block = None
    if section is not None and stripped and indent <= section:
      section = None
    if re.fullmatch(r"Examples?:", stripped):
      section = indent
      line = " " * indent + "Examples:"
    elif section is None and block is None and stripped.startswith(">>>"):
      block = indent
      out.append(" " * indent + "```pycon")
    out.append(line)
  if block is not None:
    out.append(" " * block + "```")
  return "\n".join(out)


def _scopes(obj):
  """The object itself (if it has members), then its parents, innermost first."""
  node = obj if isinstance(obj, (griffe.Module, griffe.Class)) else obj.parent
  while node is not None:
    yield node
    node = node.parent


class SphinxRoles(griffe.Extension):
  """Rewrites ``:role:`target``` in every docstring of the package (see the module docstring)."""

  def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
    self._visit(pkg, pkg, set())

  def _visit(self, root, obj, seen):
    if id(obj) in seen:
      return
    seen.add(id(obj))
    if obj.docstring is not None:
      text = ROLE.sub(lambda m: self._replace(root, obj, m), obj.docstring.value)
      obj.docstring.value = _fence_doctests(text)
    for member in list(obj.members.values()):
      if not isinstance(member, griffe.Alias):
        self._visit(root, member, seen)

  def _replace(self, root, obj, match) -> str:
    _, short, target = match.groups()
    shown = target.rsplit(".", 1)[-1] if short else target
    code = f"<code>{html.escape(shown)}</code>"
    found = None
    if target.split(".")[0] == root.name:
      found = _step(root, target)
    else:
      for scope in _scopes(obj):
        found = _step(root, f"{scope.path}.{target}")
        if found is not None:
          break
    if found is not None:
      return f'<autoref identifier="{found.path}" optional>{code}</autoref>'
    if target.split(".")[0] in EXTERNAL:
      return code
    where = f"{obj.relative_filepath}:{obj.lineno}" if obj.lineno else str(obj.relative_filepath)
    _log.warning("%s: docstring of %s refers to %s, which names nothing", where, obj.path, match.group(0))
    return code
