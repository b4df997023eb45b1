"""The repositories' own config files, read as data: YAML (DPS, RED-diff, DDS), JSON, and the
ml_collections ``.py`` configs of score_sde_pytorch / score-MRI.

A ``.py`` config is NOT executed: its ``get_config()`` is read with ``ast`` as the sequence of
literal assignments it is (``model.nf = 128``, ``training = config.training``, ...); the
``get_default_configs()`` / ``get_config()`` it imports from ``configs.<module>`` is found in
the config's own folder tree and read the same way. Non-literal values (``torch.device(...)``)
are skipped.
"""

from __future__ import annotations

import ast
import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ...errors import InputError


def read_config(src) -> dict:
    """A nested dict from a mapping, a config file (.yaml/.yml/.json/.py) or a list of these
    (merged in order, later values win)."""
    if src is None:
        return {}
    if isinstance(src, Mapping):
        return copy.deepcopy(dict(src))
    if isinstance(src, (list, tuple)):
        out: dict = {}
        for item in src:
            _merge(out, read_config(item))
        return out
    path = Path(src)
    if not path.is_file():
        raise InputError(f"prior config {str(path)!r} does not exist.")
    try:
        if path.suffix in (".yaml", ".yml"):
            cfg = yaml.safe_load(path.read_text())
        elif path.suffix == ".json":
            cfg = json.loads(path.read_text())
        elif path.suffix == ".py":
            cfg = _PyConfig(path).call("get_config")
        else:
            raise InputError(f"prior config {str(path)!r}: expected .yaml, .yml, .json or .py.")
    except (yaml.YAMLError, json.JSONDecodeError, SyntaxError) as err:
        raise InputError(f"prior config {str(path)!r} cannot be parsed "
                         f"({str(err).splitlines()[0]}).") from err
    if not isinstance(cfg, dict):
        raise InputError(f"prior config {str(path)!r} does not hold a mapping of options.")
    return cfg


def _merge(dst: dict, src: Mapping) -> dict:
    for key, value in src.items():
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)
    return dst


def flatten(cfg: Mapping, prefix: str = "") -> dict:
    """{"model": {"nf": 128}} -> {"model.nf": 128}."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _PyConfig:
    """One ml_collections config module, read with ``ast``."""

    def __init__(self, path: Path, depth: int = 0):
        if depth > 8:
            raise InputError(f"prior config {str(path)!r}: imports nest too deeply.")
        self.path, self.depth = path, depth
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.imports: dict[str, tuple[str, str]] = {}      # local name -> (module, name)
        for node in self.tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (node.module, alias.name)

    def _module_file(self, module: str) -> Path:
        rel = Path(*module.split(".")).with_suffix(".py")
        for folder in self.path.resolve().parents:
            if (folder / rel).is_file():
                return folder / rel
        raise InputError(f"prior config {str(self.path)!r} imports {module!r}, which is not "
                         "found next to it; keep the repository's configs/ folder together.")

    def call(self, fname: str) -> dict:
        funcs = {n.name: n for n in self.tree.body if isinstance(n, ast.FunctionDef)}
        if fname not in funcs:
            raise InputError(f"prior config {str(self.path)!r} defines no {fname}().")
        env: dict[str, list[str]] = {}        # local name -> path in the root dict
        root: dict = {}
        for stmt in funcs[fname].body:
            if isinstance(stmt, ast.Return):
                break
            if isinstance(stmt, ast.Assign):
                self._assign(stmt, env, root)
        return root

    def _value(self, node: ast.AST, env: dict, root: dict) -> tuple[bool, Any]:
        """(known, value) of an expression: literals, config sub-trees, ConfigDict(), and
        calls of imported config functions."""
        try:
            return True, ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
        path = self._path(node, env)
        if path is not None:
            value = root
            for key in path:
                if not isinstance(value, dict) or key not in value:
                    return False, None
                value = value[key]
            return True, copy.deepcopy(value)
        if isinstance(node, ast.Call) and not node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == "ConfigDict":
                return True, {}
            if isinstance(func, ast.Name) and func.id in self.imports:
                module, real = self.imports[func.id]
                if module.split(".")[0] == "configs":
                    sub = _PyConfig(self._module_file(module), self.depth + 1)
                    return True, sub.call(real)
        return False, None

    @staticmethod
    def _path(node: ast.AST, env: dict) -> list[str] | None:
        attrs = []
        while isinstance(node, ast.Attribute):
            attrs.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id] + attrs[::-1]
        return None

    def _assign(self, stmt: ast.Assign, env: dict, root: dict) -> None:
        known, value = self._value(stmt.value, env, root)
        alias = self._path(stmt.value, env)
        for target in stmt.targets:
            if isinstance(target, ast.Name):
                if alias is not None:                 # training = config.training
                    env[target.id] = alias
                elif known and isinstance(value, dict):
                    if not env:                       # config = get_default_configs()
                        root.clear()
                        root.update(value)
                        env[target.id] = []
                    else:
                        env[target.id] = [target.id]
                        root[target.id] = value
                continue
            path = self._path(target, env)
            if path is None or not known:
                continue
            node = root
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
            if isinstance(value, dict):               # config.x = x = ConfigDict()
                for other in stmt.targets:
                    if isinstance(other, ast.Name):
                        env[other.id] = path
