"""A real two-node Ray cluster, token authentication on, driven by README.md's own commands.

`ray start --head` and `ray start --address` run as separate process trees, each with its own
HOME as if on its own machine: the head has the token file, the second node only
RAY_AUTH_TOKEN, the submitting client a copy of the file. The commands come from the README's
"Running on a Ray cluster" section and bash runs them as written; the test fills in HEAD_IP,
the ports 6379/8265 and $STORE, and appends to `ray start` only what keeps this cluster apart
from the other Ray instances on the machine (:data:`ISOLATION`, and each node's own temp dir
and ports). One CPU per node makes train's two DDP workers span both nodes.

The chain runs twice on the same cluster, both at once: on a local directory (on one
machine, a path every node reaches) and with every path on s3:// against the moto server, the
credentials passed only through the jobs' runtime environment, as the README says; the secret
must appear in no output. Every job's output must be free of error-level lines (Ray's known
noise included, see pipeline/raynoise.py), and a submission without the token, or without
RAY_AUTH_MODE, is refused.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SECTION = "## Running on a Ray cluster"
TIMEOUT_S = 300  # per command: generous for a loaded 2-core machine, never hit when healthy

# What the test adds to the README's `ray start`: --block keeps each node one process tree we
# stop by PID; the rest keeps it apart from other Ray instances on this machine.
ISOLATION = "--block --num-cpus=1 --disable-usage-stats"

# Error-level lines in a job's output: Ray's C++ (`[... E pid tid]`, F = fatal), Ray's and our
# Python loggers at ERROR or CRITICAL, tracebacks.
ERROR_LINE = re.compile(
    r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [EF] \d+ \d+\]"
    r"|\d\d:\d\d:\d\d(,\d+)?\s+(ERROR|CRITICAL)\b"
    r"|Traceback \(most recent call last\)"
)


# ----------------------------------------------------------------------------- the README


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block in the README's cluster section."""
    text = README.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def commands(text: str) -> list[str]:
    """A shell block's commands: continuations joined, comments and blank lines dropped."""
    found = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", raw).strip()
        if line and not line.startswith("#"):
            found.append(re.sub(r"\s+", " ", line))
    return found


def readme_block(containing: str) -> list[str]:
    found = [commands(text) for lang, text in readme_blocks() if lang == "bash"]
    found = [block for block in found if any(containing in c for c in block)]
    assert len(found) == 1, f"README's cluster section needs one block with {containing!r}"
    return found[0]


def readme_runtime_env_keys() -> set[str]:
    """The variables the README's runtime-env example passes to a job."""
    import yaml

    found = [text for lang, text in readme_blocks() if lang == "yaml"]
    assert len(found) == 1, "README's cluster section needs one runtime-env YAML example"
    return set(yaml.safe_load(found[0])["env_vars"])


def test_readme_cluster_section_has_the_commands_this_test_runs():
    """Cheap, so not marked slow: the blocks the cluster tests execute exist and say what a
    client and a node need (RAY_AUTH_MODE=token, the token, a dashboard on 127.0.0.1)."""
    head = readme_block("ray start --head")
    node = readme_block("ray start --address")
    client = readme_block("ray job submit")
    for block in (head, node, client):
        assert "export RAY_AUTH_MODE=token" in block
    assert any(c.startswith("ray get-auth-token") for c in head)
    assert any("--dashboard-host=127.0.0.1" in c for c in head)
    jobs = [re.search(r"python (jobs/\w+\.py)", c).group(1) for c in client if "submit" in c]
    assert jobs == ["jobs/train.py", "jobs/export.py", "jobs/encode.py", "jobs/verify.py"]
    assert all("ray job submit --working-dir . --" in c for c in client if "submit" in c)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= readme_runtime_env_keys()
    assert "RAY_AUTH_MODE=disabled" not in " ".join(head + node + client)


# ----------------------------------------------------------------------------- the cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env() -> dict[str, str]:
    """This process's environment without anything Ray or S3: each 'machine' starts clean."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class Machine:
    """One 'machine' of the cluster: a HOME and an environment that the README's `export`
    lines extend."""

    name: str
    home: Path
    env: dict[str, str]
    fill: dict[str, str]  # README placeholder -> this cluster's value
    isolation: str = ""  # flags of this node's own, appended to `ray start` with ISOLATION
    started: list[subprocess.Popen] = field(default_factory=list)

    def filled(self, command: str) -> str:
        for placeholder, value in self.fill.items():
            command = command.replace(placeholder, value)
        return command

    def run_block(self, block: list[str], **overrides: str) -> list[subprocess.CompletedProcess]:
        """Run a README block: exports set variables (``overrides`` win, e.g. STORE), `ray
        start` becomes a node process, every other line runs in bash; returns the results."""
        results = []
        for command in block:
            if command.startswith("export "):
                name, value = command.removeprefix("export ").split("=", 1)
                self.env[name] = overrides.get(name, self.filled(value))
            elif command.startswith("ray start"):
                self.start_node(self.filled(command))
            else:
                results.append(self.bash(command))
        return results

    def bash(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["bash", "-c", command],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        if check:
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def start_node(self, command: str) -> None:
        log_path = self.home / f"{self.name}-ray-start.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command} {ISOLATION} {self.isolation}"],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: stopped as one, nobody else's
            )
        self.started.append(proc)
        deadline = time.monotonic() + TIMEOUT_S
        while "Ray runtime started" not in log_path.read_text():
            assert proc.poll() is None, f"{command} exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{command} did not start in {TIMEOUT_S} s"
            time.sleep(0.5)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each `ray start --block` with its node's processes (as `ray stop` would, but
    only these), then SIGKILL whatever is left in their sessions: only processes this test
    started are in them. A node still draining after a few seconds holds nothing we need."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 8
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        for victim in _session_members(proc.pid):
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: the session id
            members.append(int(entry))
    return members


@dataclass
class Cluster:
    head: Machine
    node: Machine
    client: Machine
    token: str
    dashboard: str

    def api(self, path: str):
        """GET the dashboard's REST API with the token (what the CLI and `ray list` use)."""
        request = urllib.request.Request(
            f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def jobs(self) -> list[dict]:
        return self.api("/api/jobs/")

    def actor_nodes(self, submission_id: str, class_name: str) -> set[str]:
        """The nodes that ran a job's actors of ``class_name`` (dead ones are still listed)."""
        job_id = self.api(f"/api/jobs/{submission_id}")["job_id"]
        query = urllib.parse.urlencode(
            {"filter_keys": "class_name", "filter_predicates": "=", "filter_values": class_name}
        )
        rows = self.api(f"/api/v0/actors?limit=1000&detail=1&{query}")["data"]["result"]["result"]
        return {row["node_id"] for row in rows if row["job_id"] == job_id}


@pytest.fixture(scope="module")
def cluster():
    # A short root: Ray's unix sockets live under --temp-dir and their paths are length-limited.
    root = Path(tempfile.mkdtemp(prefix="lpc-", dir="/tmp"))
    gcs, dashboard = _free_port(), _free_port()
    fill = {"HEAD_IP": "127.0.0.1", "6379": str(gcs), "8265": str(dashboard)}
    homes = {name: root / name for name in ("head", "node", "client")}
    for home in homes.values():
        home.mkdir()

    def machine(name: str, isolation: str, **env: str) -> Machine:
        env = {**_base_env(), "HOME": str(homes[name]), **env}
        return Machine(name, homes[name], env, fill, isolation)

    # Fixed default ports (agent 52365, client server 10001) would collide with other
    # instances on this machine: every node gets its own.
    head = machine(
        "head",
        f"--temp-dir={root / 'ray'} --ray-client-server-port={_free_port()} "
        f"--dashboard-agent-listen-port={_free_port()}",
    )
    started: list[subprocess.Popen] = []
    try:
        head.run_block(readme_block("ray start --head"))
        started += head.started
        token_file = homes["head"] / ".ray" / "auth_token"
        token = token_file.read_text().strip()
        assert token and oct(token_file.stat().st_mode & 0o777) == "0o600"

        # Its own temp dir, as on its own machine: sharing the head's would share its log
        # directory (every worker line streamed twice) and its runtime_resources (each node
        # unpacks a job's working dir afresh over the other's, under a running job).
        node = machine(
            "node",
            f"--temp-dir={root / 'ray-node'} --dashboard-agent-listen-port={_free_port()}",
            RAY_AUTH_TOKEN=token,
        )
        node.run_block(readme_block("ray start --address"))
        started += node.started

        client = machine("client", "")
        (homes["client"] / ".ray").mkdir()
        shutil.copy(token_file, homes["client"] / ".ray" / "auth_token")
        yield Cluster(head, node, client, token, f"http://127.0.0.1:{dashboard}")
    finally:
        _stop(started)
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- the chains


@dataclass
class Chain:
    """One run of the README's client block against the cluster."""

    store: str
    outputs: list[str]  # stdout+stderr of each `ray job submit` (each carries its job's log)
    everything: str  # and of every command of the block


def client(cluster: Cluster, **env: str) -> Machine:
    """The submitting machine for one chain: its own copy of the client's environment."""
    base = cluster.client
    return Machine(f"client-{secrets.token_hex(3)}", base.home, {**base.env, **env}, base.fill)


def run_chain(cluster: Cluster, store: str, submit_flags: str = "", **env: str) -> Chain:
    """The README's client block with STORE=``store``, ``submit_flags`` added to each `ray job
    submit` (the README's rule for object-store credentials) and ``env`` on the client."""
    block = readme_block("ray job submit")
    if submit_flags:
        block = [c.replace("ray job submit ", f"ray job submit {submit_flags} ", 1) for c in block]
    results = client(cluster, **env).run_block(block, STORE=store)
    outputs = [r.stdout + r.stderr for r in results if r.args[-1].startswith("ray job submit")]
    return Chain(store, outputs, "".join(r.stdout + r.stderr for r in results))


def _submission_id(output: str) -> str:
    return re.search(r"Job '(raysubmit_\w+)' submitted successfully", output).group(1)


def check_chain(cluster: Cluster, chain: Chain, read_json, exists) -> None:
    """What a chain must have done: every job succeeded without an error-level line, training
    used both nodes, and STORE holds the checkpoint, the encoder with its sidecar
    and a latent corpus whose manifest matches them; verify said ok."""
    from pipeline.artifacts.card import CARD_FILE
    from pipeline.contracts.manifest import Manifest
    from pipeline.contracts.sidecar import Sidecar
    from pipeline.latents.format import iter_latents

    for out in chain.outputs:
        lines = out.splitlines()
        bad = [i for i, line in enumerate(lines) if ERROR_LINE.search(line)]
        # The lines after the first one too: a traceback's cause is at its end.
        assert not bad, "error-level lines in a job's output:\n" + "\n".join(
            lines[bad[0] : bad[0] + 40]
        )
        assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-3000:]
    train, export, encode, verify = chain.outputs
    assert "step 4/4 " in train  # our own progress lines still show (step/total, img/s, ETA)
    # One CPU per node: the two DDP workers can only run on both nodes.
    assert len(cluster.actor_nodes(_submission_id(train), "RayTrainWorker")) == 2

    store = chain.store
    where = f"{store}/encoders/kl-f4-tiny/encoder.json"
    sidecar = Sidecar.from_dict(read_json(where), where)
    assert sidecar.model.step == 4  # configs/train/smoke.yaml's steps, run to the end
    assert sidecar.model.path.startswith(f"{store}/runs/kl-f4-tiny/checkpoint_")
    assert sidecar.model.sha256 and sidecar.latent_shape == [4, 8, 8]  # 32 px, f4, 4 channels
    # The checkpoint's model artifact, uploaded by Ray Train; the run's own files beside it.
    assert exists(f"{sidecar.model.path}/{CARD_FILE}")
    for name in ("config.yaml", "metrics.jsonl"):
        assert exists(f"{store}/runs/kl-f4-tiny/{name}"), name
    assert exists(f"{store}/encoders/kl-f4-tiny/encoder.onnx")
    where = f"{store}/latents/train/manifest.json"
    manifest = Manifest.from_dict(read_json(where), where)
    samples = read_json(f"{store}/shards/train/index.json")["samples"]
    assert manifest.samples == samples > 0 and manifest.rejects == 0
    assert manifest.encoder.sha256 == sidecar.onnx_sha256 and manifest.sidecar == sidecar
    keys = [key for key, _, _ in iter_latents(f"{store}/latents/train")]
    assert len(keys) == len(set(keys)) == samples  # every image once, read as diffusion reads
    assert re.search(r'"ok": true', verify), verify[-3000:]


@pytest.fixture(scope="module")
def chains(cluster, s3_server, tmp_path_factory) -> dict:
    """Both chains at once (on two cores most of a job's time is waiting; a train job waits
    for the other's CPUs): one on a local directory, which on one machine every node reaches,
    and one with every path on s3://, the credentials only in the jobs' runtime-env file as
    the README says; the cluster's processes have none. Futures: each test re-raises its own
    chain's failure."""
    endpoint, bucket = s3_server
    root = tmp_path_factory.mktemp("chains")
    secret = secrets.token_hex(20)  # moto takes any key; this one must never be printed
    creds = {
        "AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL": endpoint,
    }
    env_file = root / "latentpipe-s3.yaml"
    env_file.write_text(json.dumps({"env_vars": creds}))  # JSON is YAML
    env_file.chmod(0o600)
    with ThreadPoolExecutor(2) as pool:
        local = pool.submit(run_chain, cluster, str(root / "store"))
        # The client's own credentials are for `latentpipe shards`, which runs on the client.
        s3 = pool.submit(
            run_chain, cluster, f"s3://{bucket}/cluster", f"--runtime-env {env_file}", **creds
        )
        wait([local, s3])
    return {"local": local, "s3": s3, "creds": creds}


@pytest.mark.slow
def test_chain_on_shared_storage(cluster, chains):
    chain = chains["local"].result()
    check_chain(cluster, chain, lambda path: json.loads(Path(path).read_text()), os.path.exists)


@pytest.mark.slow
def test_chain_on_s3_with_credentials_only_in_the_runtime_env(cluster, chains):
    import s3fs

    creds = chains["creds"]
    assert set(creds) == readme_runtime_env_keys()
    chain = chains["s3"].result()
    fs = s3fs.S3FileSystem(endpoint_url=creds["AWS_ENDPOINT_URL"])
    check_chain(cluster, chain, lambda url: json.loads(fs.cat_file(url)), fs.exists)
    for each in ("local", "s3"):
        assert creds["AWS_SECRET_ACCESS_KEY"] not in chains[each].result().everything


@pytest.mark.slow
def test_submissions_without_the_token_are_refused(cluster):
    """A wrong token, and the right token file without RAY_AUTH_MODE=token (the client then
    sends nothing), are both refused by the cluster; no job is created."""
    before = len(cluster.jobs())
    submit = "ray job submit --working-dir . -- python -c 'print(1)'"
    machine = client(cluster)
    machine.run_block([c for c in readme_block("ray job submit") if c.startswith("export ")])
    wrong = {**machine.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    no_mode = {k: v for k, v in machine.env.items() if k != "RAY_AUTH_MODE"}
    for env, answer in (
        (wrong, "Forbidden: Invalid authentication token"),
        (no_mode, "Unauthorized: Missing authentication token"),  # as the README says
    ):
        proc = subprocess.run(
            shlex.split(submit),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert proc.returncode != 0 and answer in proc.stderr, proc.stderr[-2000:]
    assert len(cluster.jobs()) == before
