"""A small offline renderer for the subset of kustomize that k8s/ uses (kubectl is not needed in tests).

Supported kustomization fields, with kustomize's meaning:

* ``resources``: YAML files (several documents each) and directories holding a kustomization.yaml;
* ``patches``: ``path`` or inline ``patch``, with an optional ``target`` (group, version, kind, name).
  A patch that is a YAML list is a JSON 6902 patch (add, remove, replace, test; needs a target);
  a mapping is a strategic-merge patch, applied to its own kind and name unless a target is given.
  Strategic merge follows kustomize for resources without a schema: mappings merge, ``null`` deletes,
  lists of mappings that all carry one of kustomize's associative keys merge on that key, other lists
  are replaced;
* ``images``: ``name`` with ``newName``/``newTag``/``digest``, applied to every ``containers`` and
  ``initContainers`` entry, whatever the kind (as kustomize does, so the MPIJob is covered).

Anything else in a kustomization is refused with an error, so the manifests cannot silently use a
feature this renderer would ignore.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images"}
TARGET_KEYS = {"group", "version", "kind", "name"}
# kyaml's AssociativeSequenceKeys, in its order of preference.
ASSOCIATIVE_KEYS = ("mountPath", "devicePath", "ip", "type", "topologyKey", "name", "containerPort")


class KustomizeError(ValueError):
    pass


def build(path: str | Path) -> list[dict[str, Any]]:
    """Render the kustomization in directory ``path`` to a list of objects."""
    root = Path(path)
    kfile = root / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{root}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in k.get("resources") or []:
        p = root / entry
        if p.is_dir():
            objects.extend(build(p))
        elif p.is_file():
            objects.extend(d for d in yaml.safe_load_all(p.read_text()) if d is not None)
        else:
            raise KustomizeError(f"{kfile}: resource {entry!r} not found")
    _check_unique(objects, kfile)
    for patch in k.get("patches") or []:
        _apply_patch(objects, patch, root, kfile)
    for image in k.get("images") or []:
        _set_image(objects, image)
    return objects


def _id(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    group = obj.get("apiVersion", "").rpartition("/")[0]
    meta = obj.get("metadata") or {}
    return group, obj.get("kind", ""), meta.get("name", ""), meta.get("namespace", "")


def _check_unique(objects: list[dict[str, Any]], where: Path) -> None:
    seen = set()
    for obj in objects:
        if _id(obj) in seen:
            raise KustomizeError(f"{where}: {obj['kind']} {_id(obj)[2]!r} defined twice")
        seen.add(_id(obj))


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    name = (obj.get("metadata") or {}).get("name", "")
    return (
        target.get("group", group) == group
        and target.get("version", version) == version
        and target.get("kind", obj.get("kind")) == obj.get("kind")
        and ("name" not in target or re.fullmatch(target["name"], name) is not None)
    )


def _apply_patch(objects: list[dict[str, Any]], spec: dict[str, Any], root: Path, kfile: Path) -> None:
    if ("path" in spec) == ("patch" in spec):
        raise KustomizeError(f"{kfile}: a patch needs exactly one of path and patch")
    unknown = set(spec) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported patch fields {sorted(unknown)}")
    text = (root / spec["path"]).read_text() if "path" in spec else spec["patch"]
    patch = yaml.safe_load(text)
    target = spec.get("target")
    if target is not None and set(target) - TARGET_KEYS:
        raise KustomizeError(f"{kfile}: unsupported target fields {sorted(set(target) - TARGET_KEYS)}")
    if isinstance(patch, list):
        if target is None:
            raise KustomizeError(f"{kfile}: JSON 6902 patch {spec.get('path', '')!r} needs a target")
        hits = [o for o in objects if _matches(o, target)]
        for obj in hits:
            apply_json6902(obj, patch)
    elif isinstance(patch, dict):
        if target is None:
            group, _, version = patch.get("apiVersion", "").rpartition("/")
            target = {"group": group, "version": version, "kind": patch.get("kind"),
                      "name": re.escape((patch.get("metadata") or {}).get("name", ""))}
        hits = [o for o in objects if _matches(o, target)]
        for i, obj in enumerate(objects):
            if any(obj is h for h in hits):
                body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
                meta = {k: v for k, v in (body.pop("metadata", None) or {}).items() if k not in ("name", "namespace")}
                if meta:
                    body["metadata"] = meta
                objects[i] = strategic_merge(obj, body)
    else:
        raise KustomizeError(f"{kfile}: patch {spec.get('path', '')!r} is neither a list nor a mapping")
    if not hits:
        raise KustomizeError(f"{kfile}: patch {spec.get('path', '<inline>')!r} matches no resource")


# ---- strategic merge ---------------------------------------------------------------------------------


def strategic_merge(base: Any, patch: Any) -> Any:
    """``base`` with ``patch`` merged in (neither is modified)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = _associative_key(base + patch)
        if key is None:
            return copy.deepcopy(patch)
        out = copy.deepcopy(base)
        for item in patch:
            for i, existing in enumerate(out):
                if existing[key] == item[key]:
                    out[i] = strategic_merge(existing, item)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _associative_key(items: list[Any]) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    for key in ASSOCIATIVE_KEYS:
        if all(key in i for i in items):
            return key
    return None


# ---- JSON 6902 -----------------------------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, tokens: list[str], path: str) -> Any:
    node = doc
    for t in tokens[:-1]:
        try:
            node = node[int(t)] if isinstance(node, list) else node[t]
        except (KeyError, IndexError, ValueError):
            raise KustomizeError(f"JSON patch path {path!r}: {t!r} not found") from None
    return node


def apply_json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """Apply RFC 6902 operations (add, remove, replace, test) to ``doc`` in place."""
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        tokens = _pointer(path)
        if not tokens:
            raise KustomizeError("JSON patch on the whole document is not supported")
        parent, last = _parent(doc, tokens, path), tokens[-1]
        if kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), value)
            else:
                parent[last] = value
        elif kind in ("remove", "replace", "test"):
            try:
                current = parent[int(last)] if isinstance(parent, list) else parent[last]
            except (KeyError, IndexError, ValueError):
                raise KustomizeError(f"JSON patch {kind} {path!r}: no such value") from None
            if kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind == "replace":
                parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(op["value"])
            elif current != op["value"]:
                raise KustomizeError(f"JSON patch test {path!r}: {current!r} != {op['value']!r}")
        else:
            raise KustomizeError(f"JSON patch op {kind!r} is not supported")


# ---- images --------------------------------------------------------------------------------------------


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _set_image(objects: list[dict[str, Any]], spec: dict[str, Any]) -> None:
    unknown = set(spec) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise KustomizeError(f"unsupported image fields {sorted(unknown)}")

    def rewrite(image: str) -> str:
        name = spec.get("newName", _image_name(image))
        if "digest" in spec:
            return f"{name}@{spec['digest']}"
        rest = image[len(_image_name(image)):]
        if "newTag" in spec:
            rest = f":{spec['newTag']}"
        return name + rest

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for c in value:
                        if isinstance(c, dict) and _image_name(c.get("image", "")) == spec["name"]:
                            c["image"] = rewrite(c["image"])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for obj in objects:
        walk(obj)
