"""Kubernetes manifests without a cluster: render kustomize overlays, validate against CRDs.

`render` is a small kustomize for exactly the features deploy/kuberay uses (resources,
namespace, images, configMapGenerator, JSON 6902 patches with name/kind regex targets) and fails
on any other kustomization key, so a manifest never goes unchecked because the renderer skipped
it. Where kubectl is installed, `kubectl_render` runs the real kustomize and the tests require
both to agree. `crd_validators` turns KubeRay's CRD schemas into strict JSON-Schema validators:
every object schema that lists properties is closed, so a misspelt field is an error (the API
server's strict field validation) instead of being silently pruned.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "configMapGenerator",
    "generatorOptions",
    "patches",
}


def load_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


# ------------------------------------------------------------------------------ rendering


def render(directory: Path) -> list[dict]:
    """The resources `kubectl kustomize directory` would print (order aside)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZATION_KEYS
    if unknown:
        raise ValueError(f"{directory}: kustomization keys this renderer does not know: {unknown}")
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        docs.extend(render(path) if path.is_dir() else load_docs(path))
    _generate_configmaps(directory, kust, docs)
    for patch in kust.get("patches", []):
        _apply_patch(directory, patch, docs)
    for rule in kust.get("images", []):
        for doc in docs:
            _retag(doc, rule)
    if "namespace" in kust:
        for doc in docs:
            doc["metadata"]["namespace"] = kust["namespace"]
    return docs


def kubectl_render(directory: Path) -> list[dict] | None:
    """`kubectl kustomize directory` (offline), or None without kubectl."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory}: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]


def _generate_configmaps(directory: Path, kust: dict, docs: list[dict]) -> None:
    options = kust.get("generatorOptions", {})
    if set(options) - {"disableNameSuffixHash", "labels"}:
        raise ValueError(f"{directory}: unsupported generatorOptions {sorted(options)}")
    for gen in kust.get("configMapGenerator", []):
        if set(gen) - {"name", "behavior", "files", "options"}:
            raise ValueError(f"{directory}: unsupported configMapGenerator keys {sorted(gen)}")
        data = {}
        for item in gen.get("files", []):
            name, _, rel = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
            data[name] = (directory / rel).read_text()
        labels = {**options.get("labels", {}), **gen.get("options", {}).get("labels", {})}
        behavior = gen.get("behavior", "create")
        if behavior == "create":
            if not options.get("disableNameSuffixHash"):
                raise ValueError(f"{directory}: name-hash suffixes are not supported")
            meta = {"name": gen["name"], **({"labels": labels} if labels else {})}
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
            continue
        existing = [d for d in docs if key(d) == ("ConfigMap", gen["name"])]
        if len(existing) != 1 or behavior not in ("merge", "replace"):
            raise ValueError(f"{directory}: cannot {behavior} ConfigMap {gen['name']}")
        cm = existing[0]
        cm["data"] = {**cm.get("data", {}), **data} if behavior == "merge" else data
        if labels:
            cm["metadata"]["labels"] = {**cm["metadata"].get("labels", {}), **labels}


def _apply_patch(directory: Path, patch: dict, docs: list[dict]) -> None:
    target = patch.get("target", {})
    if set(patch) - {"path", "patch", "target"} or set(target) - {"kind", "name"}:
        raise ValueError(f"{directory}: unsupported patch {patch}")
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise ValueError(f"{directory}: only JSON 6902 patches (a list of ops) are supported")
    matched = [
        doc
        for doc in docs
        if re.fullmatch(target.get("kind", ".*"), doc["kind"])
        and re.fullmatch(target.get("name", ".*"), doc["metadata"]["name"])
    ]
    if not matched:
        raise ValueError(f"{directory}: patch target {target} matches nothing")
    for doc in matched:
        for op in ops:
            json_patch_op(doc, op)


def json_patch_op(doc: Any, op: dict) -> None:
    """One RFC 6902 operation (add, remove, replace, test) applied to ``doc`` in place."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    index = (len(parent) if last == "-" else int(last)) if isinstance(parent, list) else last
    kind = op["op"]
    if kind == "test":
        if parent[index] != op["value"]:
            raise ValueError(f"test failed at {op['path']}: {parent[index]!r} != {op['value']!r}")
    elif kind == "replace":
        parent[index]  # noqa: B018 - replace requires the target to exist (KeyError/IndexError)
        parent[index] = copy.deepcopy(op["value"])
    elif kind == "add":
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            parent.insert(index, value)
        else:
            parent[index] = value
    elif kind == "remove":
        del parent[index]
    else:
        raise ValueError(f"unsupported JSON patch op {kind!r}")


def _retag(node: Any, rule: dict) -> None:
    """kustomize's images transformer: every containers[]/initContainers[] image, any kind."""
    if isinstance(node, list):
        for item in node:
            _retag(item, rule)
        return
    if not isinstance(node, dict):
        return
    for field, value in node.items():
        if field in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, tag = split_image(container.get("image", ""))
                if name == rule["name"]:
                    new_tag = rule.get("newTag", tag)
                    container["image"] = rule.get("newName", name) + (
                        f":{new_tag}" if new_tag else ""
                    )
        _retag(value, rule)


def split_image(image: str) -> tuple[str, str]:
    """("registry:5000/ns/name", "tag") of an image reference (no digest support)."""
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon + 1 :]) if colon > slash else (image, "")


# ----------------------------------------------------------------------------- validation


def closed(schema: Any) -> Any:
    """A copy of an OpenAPI schema whose objects with `properties` allow no other keys."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for word in ("items", "additionalProperties", "not"):
        if isinstance(out.get(word), dict):
            out[word] = closed(out[word])
    for word in ("anyOf", "allOf", "oneOf"):
        if word in out:
            out[word] = [closed(sub) for sub in out[word]]
    return out


# metadata is a bare `type: object` in every CRD (the API server checks it); this is the part
# of ObjectMeta a manifest sets, closed the same way.
_NAME = {
    "type": "string",
    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    "maxLength": 253,
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _NAME,
        "namespace": _NAME,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "additionalProperties": False,
}

# Core objects deploy/ ships (structure only: the fields used, closed).
CORE_SCHEMAS = {
    ("v1", "ConfigMap"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "data"],
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "ConfigMap"},
            "metadata": OBJECT_META,
            "data": _STRING_MAP,
        },
        "additionalProperties": False,
    },
    ("v1", "Secret"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "type", "stringData"],
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "Secret"},
            "metadata": OBJECT_META,
            "type": {"enum": ["Opaque"]},
            "stringData": _STRING_MAP,
        },
        "additionalProperties": False,
    },
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): {
        "type": "object",
        "required": ["apiVersion", "kind", "resources"],
        "properties": {
            "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
            "kind": {"const": "Kustomization"},
            "namespace": _NAME,
            "resources": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "images": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "newName": {"type": "string"},
                        "newTag": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
            },
            "generatorOptions": {
                "type": "object",
                "properties": {"disableNameSuffixHash": {"type": "boolean"}, "labels": _STRING_MAP},
                "additionalProperties": False,
            },
            "configMapGenerator": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "files"],
                    "properties": {
                        "name": _NAME,
                        "behavior": {"enum": ["create", "merge", "replace"]},
                        "files": {"type": "array", "items": {"type": "string"}},
                        "options": {
                            "type": "object",
                            "properties": {"labels": _STRING_MAP},
                            "additionalProperties": False,
                        },
                    },
                    "additionalProperties": False,
                },
            },
            "patches": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["target"],
                    "oneOf": [{"required": ["path"]}, {"required": ["patch"]}],
                    "properties": {
                        "path": {"type": "string"},
                        "patch": {"type": "string"},
                        "target": {
                            "type": "object",
                            "properties": {"kind": {"type": "string"}, "name": {"type": "string"}},
                            "additionalProperties": False,
                        },
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
}


VENDORED_CRDS = Path(__file__).resolve().parent / "assets" / "kuberay-crds.json.gz"


def crd_schemas(crd_dir: Path) -> dict[str, dict]:
    """{"group/version/Kind": openAPIV3Schema} of each CRD's storage version in ``crd_dir``."""
    schemas = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        with open(path, encoding="utf-8") as f:
            crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
        name = f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"
        schemas[name] = version["schema"]["openAPIV3Schema"]
    return schemas


def vendored_crd_schemas() -> dict[str, dict]:
    """The copy of `crd_schemas(../shared/schemas/kuberay)` kept in tests/assets (a fresh clone
    elsewhere has no ../shared); a test keeps it equal to the source where that exists."""
    with gzip.open(VENDORED_CRDS, "rt", encoding="utf-8") as f:
        return json.load(f)["schemas"]


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """{(apiVersion, kind): strict validator} of the vendored KubeRay CRDs."""
    validators = {}
    for name, source in vendored_crd_schemas().items():
        api_version, _, kind = name.rpartition("/")
        schema = closed(source)
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "spec"})
        schema["properties"]["metadata"] = OBJECT_META
        validators[(api_version, kind)] = jsonschema.Draft7Validator(schema)
    return validators


def write_vendored(crd_dir: Path, source: str) -> None:
    payload = {"source": source, "schemas": crd_schemas(crd_dir)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    # mtime=0: the same schemas give the same bytes, so a refresh shows up in git only if they changed
    VENDORED_CRDS.write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))


def validation_errors(doc: dict) -> list[str]:
    """Every way ``doc`` breaks its schema, as "path: message" lines ([] = valid)."""
    id_ = (doc.get("apiVersion"), doc.get("kind"))
    validator = crd_validators().get(id_)
    if validator is None:
        schema = CORE_SCHEMAS.get(id_)
        if schema is None:
            return [f"no schema for apiVersion/kind {id_}"]
        validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: e.json_path)
    return [f"{e.json_path}: {e.message}" for e in errors]


if (
    __name__ == "__main__"
):  # refresh the vendored copy: python -m tests.kube ../shared/schemas/kuberay
    import sys

    write_vendored(
        Path(sys.argv[1]),
        "KubeRay CRDs (ray-project/kuberay helm-chart/kuberay-operator/crds, commit feeaf72), "
        "storage version's openAPIV3Schema, from ../shared/schemas/kuberay",
    )
