"""deploy/kuberay: every manifest, in the base and rendered through each overlay, validates
strictly against KubeRay's CRD schemas (a misspelt field fails), keeps token authentication on,
and asks only for what its cluster has; each job's entrypoint loads as a latentpipe config."""

from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from tests import kube

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
BASE = KUBERAY / "base"
TREES = {
    "base": BASE,
    **{p.name: p for p in sorted((KUBERAY / "overlays").iterdir()) if p.is_dir()},
}
SHARED_CRDS = REPO.parent / "shared" / "schemas" / "kuberay"
SECRET_EXAMPLE = KUBERAY / "secret.example.yaml"
VALUES_DIR = "/etc/latentpipe"
JOBS = ("train", "export", "encode", "verify")


def _pinned(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def _workdir() -> str:
    lines = (REPO / "deploy" / "Dockerfile").read_text().splitlines()
    return [ln.split(None, 1)[1].strip() for ln in lines if ln.startswith("WORKDIR ")][-1]


@pytest.fixture(scope="module", params=sorted(TREES))
def rendered(request) -> tuple[str, list[dict]]:
    """(name, resources) of the base and of every overlay, as kubectl would apply them."""
    directory = TREES[request.param]
    docs = kube.kubectl_render(directory)
    return request.param, docs if docs is not None else kube.render(directory)


def _cluster_specs(docs: list[dict]):
    """(owner name, RayClusterSpec) of the RayCluster and of every RayJob's own cluster."""
    for doc in docs:
        if doc["kind"] == "RayCluster":
            yield doc["metadata"]["name"], doc["spec"]
        elif doc["kind"] == "RayJob":
            yield doc["metadata"]["name"], doc["spec"]["rayClusterSpec"]


def _pods(spec: dict):
    """(group name, worker group or head spec, pod spec) of every group of a cluster spec."""
    yield "head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group, group["template"]["spec"]


# ---------------------------------------------------------------------------- the schemas


def test_vendored_crds_equal_the_shared_schemas():
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} not here (a clone outside the workspace): vendored copy used")
    assert kube.vendored_crd_schemas() == kube.crd_schemas(SHARED_CRDS), (
        "tests/assets/kuberay-crds.json.gz is stale: python -m tests.kube ../shared/schemas/kuberay"
    )


def test_every_manifest_validates_strictly(rendered):
    name, docs = rendered
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == ["ConfigMap"] * 4 + ["RayCluster"] + ["RayJob"] * 4, name
    for doc in docs:
        assert kube.validation_errors(doc) == [], f"{name}: {kube.key(doc)}"


@pytest.mark.parametrize("path", sorted(BASE.glob("*.yaml")), ids=lambda p: p.name)
def test_base_files_validate_as_written(path):
    """The files themselves, not only what kustomize makes of them."""
    for doc in kube.load_docs(path):
        assert kube.validation_errors(doc) == [], path.name


def test_kustomizations_and_secret_example_are_well_formed():
    for path in sorted(KUBERAY.rglob("kustomization.yaml")):
        assert kube.validation_errors(yaml.safe_load(path.read_text())) == [], path
    (secret,) = kube.load_docs(SECRET_EXAMPLE)
    assert kube.validation_errors(secret) == []


def _mutated(doc: dict, path: list, rename: str | None = None, value=None) -> dict:
    doc = copy.deepcopy(doc)
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    if rename is not None:
        parent[rename] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return doc


WORKER = ["spec", "rayClusterSpec", "workerGroupSpecs", 1]
CONTAINER = [*WORKER, "template", "spec", "containers", 0]


@pytest.mark.parametrize(
    ("path", "rename", "value", "expected"),
    [
        (
            ["spec", "shutdownAfterJobFinishes"],
            "shutdownAfterJobFinishs",
            None,
            "'shutdownAfterJobFinishs' was unexpected",
        ),
        (
            ["spec", "ttlSecondsAfterFinished"],
            "ttlSecondsAfterFinish",
            None,
            "'ttlSecondsAfterFinish' was unexpected",
        ),
        ([*WORKER, "maxReplicas"], "maxReplica", None, "'maxReplicas' is a required property"),
        ([*CONTAINER, "envFrom"], "envfrom", None, "'envfrom' was unexpected"),
        (["metadata", "labels"], "label", None, "'label' was unexpected"),
        (["spec", "backoffLimit"], None, "2", "'2' is not of type 'integer'"),
        (
            ["spec", "rayClusterSpec", "authOptions", "mode"],
            None,
            "tokens",
            "'tokens' is not one of",
        ),
    ],
)
def test_a_misspelt_or_mistyped_field_fails(path, rename, value, expected):
    (job,) = kube.load_docs(BASE / "rayjob-train.yaml")
    assert kube.validation_errors(job) == []
    errors = kube.validation_errors(_mutated(job, path, rename, value))
    assert any(expected in line for line in errors), errors


# ------------------------------------------------------------------- the renderer, checked


def test_python_renderer_agrees_with_kubectl_kustomize():
    """Where kubectl exists, the fallback renderer must print what kustomize prints."""
    for name, directory in TREES.items():
        real = kube.kubectl_render(directory)
        if real is None:
            pytest.skip("kubectl not installed: the manifests are rendered by tests/kube.py alone")
        ours = kube.render(directory)
        assert {kube.key(d): d for d in ours} == {kube.key(d): d for d in real}, name


def test_a_patch_aimed_at_the_wrong_group_fails_the_build(tmp_path):
    """The overlays' `test` ops guard the group indices their JSON patches use."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{BASE}]\npatches:\n  - target: {{kind: RayJob, name: latentpipe-train}}\n"
        "    patch: |\n      - {op: test, path: /spec/rayClusterSpec/workerGroupSpecs/0/groupName, value: gpu}\n"
    )
    with pytest.raises(ValueError, match="test failed"):
        kube.render(overlay)
    if kube.kubectl_render(BASE) is not None:
        with pytest.raises(RuntimeError, match="test"):
            kube.kubectl_render(overlay)


# ------------------------------------------------------------------ what KubeRay then checks


def test_token_authentication_is_on_everywhere(rendered):
    name, docs = rendered
    ray_version = _pinned("ray")
    for owner, spec in _cluster_specs(docs):
        assert spec["authOptions"] == {"mode": "token"}, f"{name}/{owner}"
        # KubeRay enables token auth only from a declared rayVersion (>= 2.52); ours is the pin
        assert spec["rayVersion"] == ray_version, f"{name}/{owner}"
    text = "\n".join(p.read_text() for p in KUBERAY.rglob("*.yaml"))
    assert not re.search(r"RAY_AUTH_MODE\W+disabled|mode:\s*disabled", text)


def test_worker_groups_are_consistent(rendered):
    name, docs = rendered
    for owner, spec in _cluster_specs(docs):
        groups = spec.get("workerGroupSpecs", [])
        assert len({g["groupName"] for g in groups}) == len(groups), owner
        for group in groups:
            lo, hi = group["minReplicas"], group["maxReplicas"]
            assert 0 <= lo <= hi, f"{name}/{owner}/{group['groupName']}"
            assert lo <= group.get("replicas", lo) <= hi, f"{name}/{owner}/{group['groupName']}"
        if not spec["enableInTreeAutoscaling"]:
            # without an autoscaler nothing would ever move a group off its minimum
            assert all(g["minReplicas"] == g["maxReplicas"] for g in groups), f"{name}/{owner}"
    (cluster,) = [spec for owner, spec in _cluster_specs(docs) if owner == "latentpipe"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu", "gpu"]


def test_rayjobs_clean_up_and_bound_their_retries(rendered):
    name, docs = rendered
    jobs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "RayJob"}
    assert sorted(jobs) == sorted(f"latentpipe-{job}" for job in JOBS)
    for job, spec in jobs.items():
        assert spec["shutdownAfterJobFinishes"] is True, job
        assert spec["ttlSecondsAfterFinished"] > 0, job
        assert spec["activeDeadlineSeconds"] > 0, job
        assert spec["backoffLimit"] >= 0 and spec["submitterConfig"]["backoffLimit"] >= 0, job
        assert "clusterSelector" not in spec and "deletionStrategy" not in spec, job
    # a failed check is a finding, not an accident: verify is never retried
    assert jobs["latentpipe-verify"]["backoffLimit"] == 0


def test_pods_run_the_image_as_its_unprivileged_user(rendered):
    name, docs = rendered
    workdir = _workdir()
    images = set()
    for owner, spec in _cluster_specs(docs):
        for group, _, pod in _pods(spec):
            where = f"{name}/{owner}/{group}"
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] != 0, where
            if group != "head":  # the head's autoscaler uses the service account token
                assert pod["automountServiceAccountToken"] is False, where
            (container,) = pod["containers"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["workingDir"] == workdir, where  # entrypoints are relative to it
            images.add(container["image"])
    assert len(images) == 1, f"{name}: every pod of every cluster runs one image, got {images}"


def test_credentials_come_from_the_secret_only(rendered):
    """Object-store keys only through envFrom the Secret the example defines; no literal
    credential-looking value anywhere; the example holds placeholders and is applied by no one."""
    name, docs = rendered
    (secret,) = kube.load_docs(SECRET_EXAMPLE)
    assert all(re.fullmatch(r"<[^<>]+>", v) for v in secret["stringData"].values()), secret
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    for owner, spec in _cluster_specs(docs):
        for group, _, pod in _pods(spec):
            (container,) = pod["containers"]
            refs = [e["secretRef"]["name"] for e in container["envFrom"]]
            assert refs == [secret["metadata"]["name"]], f"{name}/{owner}/{group}"
            for env in container.get("env", []):
                assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]), env
    for path in KUBERAY.rglob("kustomization.yaml"):
        resources = yaml.safe_load(path.read_text())["resources"]
        assert not any(r.endswith(SECRET_EXAMPLE.name) for r in resources), path
    assert not any(d["kind"] == "Secret" for d in docs)


# ----------------------------------------------------------- entrypoints and values files


def _job_command(docs: list[dict], job: str, tmp_path: Path) -> tuple[str, list[str], list[str]]:
    """(command, yaml paths, overrides) of a RayJob, with /etc/latentpipe/* materialised
    from the ConfigMap its head mounts there."""
    (spec,) = [d["spec"] for d in docs if d["metadata"]["name"] == f"latentpipe-{job}"]
    # KubeRay pastes the entrypoint into a shell line after `ray job submit ... --`: any shell
    # syntax (;, &&, |, $, quotes) would run in the submitter pod, not in the job
    assert not re.search(r"[;&|$`'\"<>(){}\\]", spec["entrypoint"]), spec["entrypoint"]
    python, script, *args = shlex.split(spec["entrypoint"])
    assert (python, script) == ("python", f"jobs/{job}.py")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == VALUES_DIR]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == f"latentpipe-{job}-values"
    (values,) = [d for d in docs if kube.key(d) == ("ConfigMap", f"latentpipe-{job}-values")]
    assert values["metadata"]["labels"]["latentpipe.io/job"] == job  # applied with its job
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths, overrides = [], []
    for arg in args:
        if "=" in arg:
            overrides.append(arg)
        elif arg.startswith(VALUES_DIR + "/"):
            local = tmp_path / arg.rsplit("/", 1)[1]
            local.write_text(values["data"][local.name])
            paths.append(str(local))
        else:
            assert (REPO / arg).is_file(), arg
            paths.append(str(REPO / arg))
    assert any(p.startswith(str(tmp_path)) for p in paths), f"{job}: values file not passed"
    return job, paths, overrides


# Each job's root config dataclass, from the module that defines it: the CLI's command modules
# would also import Ray, Ray Data and ONNX Runtime, seconds this test does not need.
SCHEMAS = {
    "train": ("pipeline.train.config", "TrainRunConfig"),
    "export": ("pipeline.export.job", "ExportConfig"),
    "encode": ("pipeline.encode.config", "EncodeConfig"),
    "verify": ("pipeline.verify.job", "VerifyConfig"),
}


def _schema(job: str):
    module, name = SCHEMAS[job]
    return getattr(importlib.import_module(module), name)


def test_schemas_are_the_cli_commands():
    from pipeline.cli import COMMANDS

    for job, (_, name) in SCHEMAS.items():
        assert COMMANDS[job].schema == name, job
        assert f'main(["{job}", *sys.argv[1:]])' in (REPO / "jobs" / f"{job}.py").read_text()


def _load(docs, job, tmp_path):
    _, paths, overrides = _job_command(docs, job, tmp_path)
    return load_config(_schema(job), paths, overrides)


def _group(spec: dict, name: str) -> tuple[int, dict]:
    """(pods, resource limits) of a worker group; (0, {}) when the cluster has none."""
    for group in spec.get("workerGroupSpecs", []):
        if group["groupName"] == name:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            return group["maxReplicas"], limits
    return 0, {}


def _cluster_of(docs, job):
    (spec,) = [d["spec"] for d in docs if d["metadata"]["name"] == f"latentpipe-{job}"]
    return spec["rayClusterSpec"]


def test_train_values_fit_the_train_cluster(rendered, tmp_path):
    name, docs = rendered
    cfg = _load(docs, "train", tmp_path)
    pods, limits = _group(_cluster_of(docs, "train"), "gpu" if cfg.train.use_gpu else "cpu")
    assert cfg.train.num_workers == pods, f"{name}: one DDP worker per pod"
    assert cfg.train.cpus_per_worker <= float(limits["cpu"]), name
    assert cfg.data.num_workers < cfg.train.cpus_per_worker, name
    if cfg.train.use_gpu:
        assert int(limits["nvidia.com/gpu"]) == 1, name
    assert cfg.train.max_failures >= 1, f"{name}: a lost node must not end the job"


def test_encode_values_fit_the_encode_cluster(rendered, tmp_path):
    name, docs = rendered
    cfg = _load(docs, "encode", tmp_path)
    assert cfg.device in ("cpu", "cuda"), f"{name}: auto looks for a GPU on the GPU-less head"
    spec = _cluster_of(docs, "encode")
    pods, limits = _group(spec, "gpu" if cfg.device == "cuda" else "cpu")
    per_pod = int(float(limits["cpu"]) // cfg.actor_cpus)
    if cfg.device == "cuda":
        per_pod = min(per_pod, int(limits["nvidia.com/gpu"]))
    assert 1 <= cfg.min_actors <= cfg.num_actors <= pods * per_pod, name
    assert cfg.decode_threads <= cfg.actor_cpus, name


def test_values_chain_the_jobs(rendered, tmp_path):
    """export reads what train writes, encode uses what export writes, verify checks what
    encode writes: an overlay that moves one output moves the next job's input too."""
    name, docs = rendered
    train, export, encode, verify = (_load(docs, job, tmp_path / job) for job in JOBS)
    assert export.model.rstrip("/") == f"{train.train.storage_path}/{train.train.run_name}", name
    assert export.device == "cpu", f"{name}: the export runs on the GPU-less head"
    assert encode.encoder == f"{export.output.rstrip('/')}/encoder.onnx", name
    assert verify.output == encode.output, name
    for url in (train.data.shards, train.train.storage_path, export.output, encode.output):
        assert url.startswith("s3://"), f"{name}: {url} is not reachable from every pod"


def test_a_misspelt_values_key_fails_the_job_before_it_starts(tmp_path):
    docs = kube.render(BASE)
    (values,) = [d for d in docs if kube.key(d) == ("ConfigMap", "latentpipe-encode-values")]
    values["data"]["encode.yaml"] += "num_actor: 4\n"
    with pytest.raises(ConfigError, match="num_actor"):
        _load(docs, "encode", tmp_path)
