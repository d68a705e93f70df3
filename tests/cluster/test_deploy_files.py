"""The deploy files under cluster/ parse, validate and agree with each other, offline.

Nothing here starts a container, a cluster or a cloud call: the cluster-launcher files are
checked against the schema Ray ships (and Ray's own config checks), the Kubernetes
manifests by their structure, the Dockerfiles by their instructions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCKERIGNORE = CLUSTER / "Dockerfile.dockerignore"
MLFLOW_DOCKERFILE = CLUSTER / "mlflow" / "Dockerfile"

YAML_FILES = sorted({*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")})
DOCKERFILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file()
                     and (p.name == "Dockerfile" or p.name.endswith(".Dockerfile")))
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))
MLFLOW_FILES = sorted((CLUSTER / "mlflow").glob("*.yaml"))

# The GPU each worker type's machine holds: (Ray accelerator type, GPUs per machine).
MACHINE_GPUS = {
    "Standard_ND96isr_H100_v5": ("H100", 8),
    "Standard_NC96ads_A100_v4": ("A100", 4),
    "p5.48xlarge": ("H100", 8),
    "p4d.24xlarge": ("A100", 8),
}
LAUNCHER_NODE_TYPES = {"azure.yaml": {"nd_h100_v5", "nc_a100_v4"}, "aws.yaml": {"p5", "p4d"}}

DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY",
                       "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL",
                       "HEALTHCHECK", "SHELL"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_docs(path: Path) -> list:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def first_doc_or_none(path: Path):
    try:
        return next(iter(load_docs(path)), None)
    except yaml.YAMLError:
        return None  # test_yaml_parses reports it


def is_launcher_config(path: Path) -> bool:
    doc = first_doc_or_none(path)
    return isinstance(doc, dict) and "provider" in doc and "cluster_name" in doc


# Ray cluster-launcher files: every YAML with a provider and a cluster name.
LAUNCHER_FILES = [p for p in YAML_FILES if is_launcher_config(p)]


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{rel(path)}: expected one YAML document, found {len(docs)}"
    return docs[0]


def k8s_objects(paths) -> list[tuple[Path, dict]]:
    return [(p, doc) for p in paths for doc in load_docs(p) if isinstance(doc, dict) and "kind" in doc]


def cluster_spec(obj: dict) -> dict:
    """The RayCluster spec of a RayCluster or of a RayJob's own cluster."""
    return obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterSpec"]


def containers_of(obj: dict) -> list[dict]:
    spec = cluster_spec(obj)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def header_commands(path: Path) -> list[str]:
    """The shell commands a file's comments show, continuation lines joined."""
    commands, pending = [], ""
    for line in path.read_text().splitlines():
        if not line.lstrip().startswith("#"):
            continue
        text = line.lstrip()[1:].strip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        if pending or text:
            commands.append((pending + text).strip())
        pending = ""
    return commands


def documented_secrets(path: Path) -> dict[str, dict[str, str]]:
    """{Secret name: {key: value}} of the `kubectl create secret generic` commands a file's comments show."""
    secrets = {}
    for command in header_commands(path):
        match = re.search(r"kubectl create secret generic ([\w.-]+)", command)
        if match:
            literals = [arg.split("=", 2)[1:] for arg in shlex.split(command) if arg.startswith("--from-literal=")]
            secrets.setdefault(match.group(1), {}).update(literals)
    return secrets


# --- Dockerfiles ----------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuations joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (and parser directives) may sit inside a continuation too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            word, _, args = full.partition(" ")
            out.append((word, args.strip()))
    assert not pending, f"{rel(path)}: the last instruction ends with a line continuation"
    return out


def documented_tag(path: Path) -> str:
    """The image name the Dockerfile's header tells users to build (`docker build ... -t NAME`)."""
    tags = set(re.findall(r"^#\s+docker build .*?-t (\S+)", path.read_text(), re.M))
    assert len(tags) == 1, f"{rel(path)}: expected one documented `docker build -t` tag, found {tags}"
    return tags.pop()


def copy_sources(instructions) -> list[str]:
    sources = []
    for word, args in instructions:
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


@pytest.mark.parametrize("path", DOCKERFILES, ids=rel)
def test_dockerfile_instructions_are_valid(path):
    instructions = dockerfile_instructions(path)
    assert instructions, f"{rel(path)} has no instructions"
    unknown = [word for word, _ in instructions if word.upper() not in DOCKER_INSTRUCTIONS]
    assert not unknown, f"{rel(path)}: not Dockerfile instructions: {unknown}"
    assert all(word.isupper() for word, _ in instructions), f"{rel(path)}: write instructions in capitals"
    words = [word for word, _ in instructions]
    first_from = words.index("FROM")
    assert set(words[:first_from]) <= {"ARG"}, f"{rel(path)}: only ARG may come before the first FROM"
    # An ARG used in FROM must be declared before it.
    declared = {args.split("=")[0] for word, args in instructions[:first_from]}
    used = set(re.findall(r"\$\{?(\w+)", instructions[first_from][1]))
    assert used <= declared, f"{rel(path)}: FROM uses undeclared build args {used - declared}"
    for word, args in instructions:
        assert args, f"{rel(path)}: {word} without arguments"


def test_image_dockerfile_installs_the_project_vllm_and_mlflow():
    instructions = dockerfile_instructions(DOCKERFILE)
    words = [word for word, _ in instructions]
    assert "ENTRYPOINT" not in words, "Ray starts the container's processes; the image needs no ENTRYPOINT"
    arg_defaults = dict(args.split("=", 1) for word, args in instructions if word == "ARG" and "=" in args)
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: arg_defaults.get(m.group(1), m.group(0)),
                  next(args for word, args in instructions if word == "FROM"))
    assert re.match(r"(docker\.io/)?(rayproject/ray|nvidia/cuda):", base), f"base on a Ray or CUDA image, not {base}"

    # Everything pip needs to build the project: pyproject.toml (and the readme it names),
    # every package setuptools is told to find, and the Hydra configs.
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"pyproject.toml", pyproject["project"]["readme"], "conf", *packages}
    sources = {s.rstrip("/") for s in copy_sources(instructions)}
    assert needed <= sources, f"cluster/Dockerfile does not COPY {sorted(needed - sources)}"
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"cluster/Dockerfile copies paths the repository lacks: {missing}"

    commands = [c.strip() for word, args in instructions if word == "RUN" for c in re.split(r"&&|\|\||;", args)]
    pip_args = [arg for c in commands if re.match(r"(python3? -m )?pip3? install\s", c) for arg in shlex.split(c)[2:]]
    requirements = {re.split(r"[<>=!~\[;\s]", a, maxsplit=1)[0].lower() for a in pip_args if not a.startswith("-")}
    for package in ("vllm", "mlflow"):
        assert package in requirements, f"cluster/Dockerfile does not pip install {package}"
    assert {"/app", "/app/"} & requirements, "cluster/Dockerfile does not pip install the project (/app)"


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    """cluster/Dockerfile.dockerignore (read by BuildKit for cluster/Dockerfile) must not hide a COPY source."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            pattern = line.lstrip("!").strip("/")
            regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*") \
                .replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            rules.append((re.compile(regex + "$"), negate))

    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        verdict = False
        for regex, negate in rules:  # the last matching rule wins
            if any(regex.match(p) for p in prefixes):
                verdict = not negate
        return verdict

    for source in copy_sources(dockerfile_instructions(DOCKERFILE)):
        src = ROOT / source
        files = [src] if src.is_file() else [f for f in src.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        hidden = [rel(f) for f in files if excluded(rel(f))]
        assert not hidden, f"cluster/Dockerfile.dockerignore hides files the image needs: {hidden[:5]}"
    for junk in (".git/HEAD", ".venv/bin/python", "mlflow.db", "mlruns/0/meta.yaml", "tests/conftest.py",
                 "orchestrator/__pycache__/cli.cpython-311.pyc"):
        assert excluded(junk), f"cluster/Dockerfile.dockerignore lets {junk} into the build context"


# --- YAML, everywhere -------------------------------------------------------------------------

def test_the_deploy_files_exist():
    expected = ["azure.yaml", "aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                "mlflow/mlflow.yaml", "Dockerfile", "README.md"]
    missing = [name for name in expected if not (CLUSTER / name).is_file()]
    assert not missing, f"missing under cluster/: {missing}"


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{rel(path)} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{rel(path)}: every document should be a mapping"


def test_the_readme_names_every_deploy_file():
    readme = (CLUSTER / "README.md").read_text()
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and p.name not in ("README.md", ".gitignore", ".env")
             and "__pycache__" not in p.parts]
    unnamed = [str(p.relative_to(CLUSTER)) for p in files if str(p.relative_to(CLUSTER)) not in readme]
    assert not unnamed, f"cluster/README.md does not mention {unnamed}"


# --- Ray cluster-launcher files --------------------------------------------------------------

def test_launcher_files_found():
    assert {p.name for p in LAUNCHER_FILES} >= set(LAUNCHER_NODE_TYPES)


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=rel)
def test_launcher_file_validates_against_rays_schema(path, ray_schema):
    config = load_one(path)
    errors = sorted(jsonschema.Draft7Validator(ray_schema).iter_errors(config), key=str)
    assert not errors, f"{rel(path)}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=rel)
def test_launcher_file_passes_rays_own_checks(path):
    """What `ray up` does first: merge the provider's defaults, then validate (no cloud calls)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # a private module; the schema test above still runs
        pytest.skip("this Ray has no ray.autoscaler._private.util")
    validate_config(prepare_config(load_one(path)))


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=rel)
def test_launcher_node_types(path):
    config = load_one(path)
    types = config["available_node_types"]
    assert config["head_node_type"] in types, f"{rel(path)}: head_node_type names no node type"
    assert LAUNCHER_NODE_TYPES[path.name] <= set(types), f"{rel(path)}: missing worker types"
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert sum(t.get("max_workers", 0) for t in workers.values()) >= config["max_workers"] > 0
    for name, node_type in workers.items():
        resources = node_type["resources"]
        machine = node_type["node_config"].get("InstanceType") or \
            node_type["node_config"].get("azure_arm_parameters", {}).get("vmSize")
        accelerator, gpus = MACHINE_GPUS[machine]
        assert resources.get("GPU") == gpus, f"{rel(path)} {name}: {machine} has {gpus} GPUs"
        declared = [r for r in resources if r.startswith("accelerator_type:")]
        assert declared == [f"accelerator_type:{accelerator}"], \
            f"{rel(path)} {name}: declares {declared}, expected accelerator_type:{accelerator}"
        assert resources[declared[0]] == 1
        assert 0 <= node_type.get("min_workers", 0) <= node_type["max_workers"]


def test_accelerator_names_are_the_ones_ray_detects():
    """Ray labels a node with its GPU's short name; the declared names must be those."""
    from ray.util import accelerators

    assert {name for name, _ in MACHINE_GPUS.values()} <= {accelerators.NVIDIA_H100, accelerators.NVIDIA_A100}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=rel)
def test_launcher_starts_ray_in_the_image(path):
    config = load_one(path)
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    assert config["docker"]["container_name"]


def test_azure_specifics():
    config = load_one(CLUSTER / "azure.yaml")
    provider = config["provider"]
    assert provider["type"] == "azure" and provider["location"] and provider["resource_group"]
    auth = config["auth"]
    assert auth["ssh_user"] and auth["ssh_private_key"] and auth["ssh_public_key"]
    for name, node_type in config["available_node_types"].items():
        arm = node_type["node_config"]["azure_arm_parameters"]
        missing = {"vmSize", "imagePublisher", "imageOffer", "imageSku", "imageVersion"} - set(arm)
        assert not missing, f"azure.yaml {name}: azure_arm_parameters lacks {missing}"
        assert all(isinstance(arm[k], str) for k in ("imageSku", "imageVersion")), \
            f"azure.yaml {name}: quote imageSku/imageVersion (ARM wants strings)"
        # Memory is not looked up on Azure: a trial's resources.memory_gb could never fit otherwise.
        if name != config["head_node_type"]:
            assert node_type["resources"].get("memory", 0) > 0, f"azure.yaml {name}: declare memory"


def test_aws_specifics():
    config = load_one(CLUSTER / "aws.yaml")
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["InstanceType"] and node_config["ImageId"], f"aws.yaml {name}: InstanceType, ImageId"


# --- KubeRay -----------------------------------------------------------------------------------

def test_kuberay_kinds():
    kinds = sorted(obj["kind"] for _, obj in k8s_objects(KUBERAY_FILES))
    assert kinds == ["RayCluster", "RayJob"], kinds
    for path, obj in k8s_objects(KUBERAY_FILES):
        assert obj["apiVersion"] == "ray.io/v1", f"{rel(path)}: apiVersion {obj['apiVersion']}"
        assert obj["metadata"]["name"]


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=rel)
def test_kuberay_cluster_spec(path):
    for obj in load_docs(path):
        spec = cluster_spec(obj)
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", "keep trials off the head"
        head_container = head["template"]["spec"]["containers"][0]
        assert head_container["name"] == "ray-head"
        assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}

        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"h100", "a100"}, f"{rel(path)}: worker groups {sorted(groups)}"
        for name, group in groups.items():
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            pod = group["template"]["spec"]
            container = pod["containers"][0]
            limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
            gpus = int(limits["nvidia.com/gpu"])
            assert gpus >= 1, f"{rel(path)} {name}: no GPU limit"
            assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, "GPU requests must equal limits"
            assert pod.get("nodeSelector") and pod.get("tolerations"), f"{rel(path)} {name}: GPU node placement"
            # rayStartParams.resources is handed to `ray start --resources=...` through a shell:
            # a quoted JSON object with escaped inner quotes.
            raw = group["rayStartParams"]["resources"]
            assert raw.startswith('"') and raw.endswith('"'), f"{rel(path)} {name}: quote the resources JSON"
            resources = json.loads(raw[1:-1].replace('\\"', '"'))
            assert resources == {f"accelerator_type:{name.upper()}": 1}, f"{rel(path)} {name}: {resources}"


def test_rayjob_runs_a_sweep():
    (path, job), = [(p, o) for p, o in k8s_objects(KUBERAY_FILES) if o["kind"] == "RayJob"]
    spec = job["spec"]
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("orchestrator run -m "), entrypoint
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    if "rayClusterSpec" in spec:
        assert spec["shutdownAfterJobFinishes"] is True, "its own cluster should go when the sweep ends"
    overrides = dict(o.split("=", 1) for o in shlex.split(entrypoint)[3:] if "=" in o)
    assert overrides["cluster.address"] == "auto"
    # tracking.uri names the MLflow Service of cluster/mlflow.
    uri = re.fullmatch(r"http://([\w-]+)\.([\w-]+)\.svc(?:\.cluster\.local)?:(\d+)", overrides["tracking.uri"])
    assert uri, overrides["tracking.uri"]
    services = {(o["metadata"]["name"], o["metadata"].get("namespace")): o
                for _, o in k8s_objects(MLFLOW_FILES) if o["kind"] == "Service"}
    service = services.get((uri.group(1), uri.group(2)))
    assert service, f"no Service {uri.group(1)} in namespace {uri.group(2)} under cluster/mlflow"
    assert int(uri.group(3)) in {p["port"] for p in service["spec"]["ports"]}


def test_rayjob_entrypoint_composes():
    """The entrypoint's overrides are valid for the project's configs (Hydra composes them)."""
    (_, job), = [(p, o) for p, o in k8s_objects(KUBERAY_FILES) if o["kind"] == "RayJob"]
    args = shlex.split(job["spec"]["entrypoint"])[2:]
    args = [a for a in args if a != "-m"]  # compose the grid's first cell, run nothing
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--cfg", "job", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "llama-3.1-8b" in proc.stdout, proc.stdout[-2000:]


# --- MLflow ------------------------------------------------------------------------------------

MLFLOW_K8S = k8s_objects(MLFLOW_FILES)
NAMESPACED = {"Secret", "Service", "StatefulSet", "Deployment", "ConfigMap", "PersistentVolumeClaim",
              "ServiceAccount", "Ingress"}


def server_command(args: list[str]) -> dict[str, str]:
    """`mlflow server` options as {flag: value} ('' for switches)."""
    assert args[:2] == ["mlflow", "server"], args[:2]
    flags, i = {}, 2
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags[args[i]], i = str(args[i + 1]), i + 2
        else:
            flags[args[i]], i = "", i + 1
    return flags


def test_mlflow_manifests_are_kubernetes_objects():
    assert MLFLOW_K8S
    for path, obj in MLFLOW_K8S:
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), \
            f"{rel(path)}: an object without apiVersion/kind/metadata.name: {obj.get('kind')}"
    kinds = [o["kind"] for _, o in MLFLOW_K8S]
    for kind in ("Namespace", "StatefulSet", "Service", "Deployment"):
        assert kind in kinds, f"cluster/mlflow has no {kind}"
    namespaces = {o["metadata"]["name"] for _, o in MLFLOW_K8S if o["kind"] == "Namespace"}
    for path, obj in MLFLOW_K8S:
        if obj["kind"] in NAMESPACED:
            assert obj["metadata"].get("namespace") in namespaces, f"{rel(path)}: {obj['kind']} outside the namespace"


def test_mlflow_selectors_and_references_resolve():
    by_kind = {}
    for _, obj in MLFLOW_K8S:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    workloads = {**by_kind.get("Deployment", {}), **by_kind.get("StatefulSet", {})}
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads.values()]
    for name, w in workloads.items():
        selector = w["spec"]["selector"]["matchLabels"]
        assert selector.items() <= w["spec"]["template"]["metadata"]["labels"].items(), f"{name}: selector"
    for name, svc in by_kind["Service"].items():
        assert any(svc["spec"]["selector"].items() <= labels.items() for labels in pod_labels), \
            f"Service {name} selects no pod"
    for name, sts in by_kind.get("StatefulSet", {}).items():
        assert sts["spec"]["serviceName"] in by_kind["Service"]
    # The Secrets are the user's, made with the `kubectl create secret` lines of the header.
    secrets = {}
    for path in MLFLOW_FILES:
        for name, keys in documented_secrets(path).items():
            secrets.setdefault(name, set()).update(keys)
    for w in workloads.values():
        for c in w["spec"]["template"]["spec"]["containers"]:
            for ref in c.get("envFrom", []):
                assert ref["secretRef"]["name"] in secrets
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in secrets.get(ref["name"], ()), f"missing Secret key {ref}"
            # Kubernetes expands $(VAR) in command/args only for variables of `env`.
            defined = {e["name"] for e in c.get("env", [])}
            used = set(re.findall(r"\$\((\w+)\)", " ".join(map(str, c.get("command", []) + c.get("args", [])))))
            assert used <= defined, f"{c['name']}: $(...) of undefined variables {used - defined}"


def test_mlflow_server_uses_postgres_and_an_artifact_store():
    (deployment,) = [o for _, o in MLFLOW_K8S if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    flags = server_command(container.get("command", []) + container.get("args", []))
    backend = re.fullmatch(r"postgresql://[^:]+:[^@]+@([\w.-]+):(\d+)/\S+", flags["--backend-store-uri"])
    assert backend, flags["--backend-store-uri"]
    assert re.match(r"(s3|wasbs|gs)://", flags["--artifacts-destination"])
    assert "--serve-artifacts" in flags and flags["--host"] == "0.0.0.0" and flags["--port"] == "5000"
    # The backend host is the Postgres Service.
    host, port = backend.groups()
    services = {f"{o['metadata']['name']}.{o['metadata']['namespace']}.svc": o
                for _, o in MLFLOW_K8S if o["kind"] == "Service"}
    assert host in services and int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    # The name the sweeps use (http://mlflow.mlflow.svc:5000) is an allowed Host header.
    allowed = flags.get("--allowed-hosts", "")
    assert not allowed or any(re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), "mlflow.mlflow.svc:5000")
                              for p in allowed.split(","))
    assert container["image"] == documented_tag(MLFLOW_DOCKERFILE)


def test_mlflow_compose():
    compose = load_one(CLUSTER / "mlflow" / "docker-compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    flags = server_command(services["mlflow"]["command"])
    assert flags["--backend-store-uri"].startswith("postgresql://")
    assert flags["--artifacts-destination"].startswith("s3://") and "--serve-artifacts" in flags
    assert (CLUSTER / "mlflow" / services["mlflow"]["build"] / "Dockerfile").is_file()


def test_mlflow_server_and_client_versions_agree():
    """The server image's MLflow is the one the project image's client has."""
    def mlflow_arg(path):
        return next(args.split("=", 1)[1] for word, args in dockerfile_instructions(path)
                    if word == "ARG" and args.startswith("MLFLOW_VERSION="))

    assert mlflow_arg(DOCKERFILE) == mlflow_arg(MLFLOW_DOCKERFILE)
    assert documented_tag(MLFLOW_DOCKERFILE).endswith(":" + mlflow_arg(MLFLOW_DOCKERFILE))


# --- Across files ------------------------------------------------------------------------------

def test_one_image_name_everywhere():
    """The launcher files and KubeRay manifests run the image cluster/Dockerfile documents."""
    tag = documented_tag(DOCKERFILE)
    assert tag in (CLUSTER / "README.md").read_text()
    seen = {}
    for path in LAUNCHER_FILES:
        seen[rel(path)] = {load_one(path)["docker"]["image"]}
    for path, obj in k8s_objects(KUBERAY_FILES):
        seen[rel(path)] = seen.get(rel(path), set()) | {c["image"] for c in containers_of(obj)}
    wrong = {name: images - {tag} for name, images in seen.items() if images - {tag}}
    assert not wrong, f"images other than the documented {tag}: {wrong}"


def test_ray_version_agrees():
    """KubeRay's rayVersion is the Ray of the image's base."""
    base = next(args for word, args in dockerfile_instructions(DOCKERFILE) if word == "ARG"
                and args.startswith("BASE_IMAGE="))
    match = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", base)
    assert match, f"cluster/Dockerfile: BASE_IMAGE is not a versioned rayproject/ray image: {base}"
    for path, obj in k8s_objects(KUBERAY_FILES):
        assert cluster_spec(obj)["rayVersion"] == match.group(1), f"{rel(path)}: rayVersion != image's Ray"


# --- Who can reach what: Ray token auth, the dashboard's address, MLflow's login -------------

COMPOSE = CLUSTER / "mlflow" / "docker-compose.yaml"
ENV_EXAMPLE = CLUSTER / "mlflow" / "env.example"
MLFLOW_YAML = CLUSTER / "mlflow" / "mlflow.yaml"
CLUSTER_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.name != ".env"
                       and "__pycache__" not in p.parts)
# A variable that holds a secret (not the path of a file that does).
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN)(?!_PATH|_FILE)", re.I)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
POD_ADDRESS = {"$POD_IP", "${POD_IP}"}  # expanded by the bash that runs KubeRay's `ray start`
HEAD_HOME = "/home/ray"  # $HOME of the image's user (rayproject/ray's `ray`), on head and workers


def docker_run_words(config: dict, head: bool) -> list[str]:
    """The `docker run` command Ray's cluster launcher starts a head's or a worker's container with."""
    docker = config["docker"]
    options = docker.get("run_options", []) + docker.get("head_run_options" if head else "worker_run_options", [])
    try:
        from ray.autoscaler._private.docker import docker_start_cmds
    except ImportError:  # a private module: the options as written
        return shlex.split(" ".join(options))
    return shlex.split(docker_start_cmds(config["auth"]["ssh_user"], docker["image"], {}, docker["container_name"],
                                         options, config["cluster_name"], HEAD_HOME, "docker"))


def flag_values(words: list[str], *flags: str) -> list[str]:
    values = [words[i + 1] for i, word in enumerate(words[:-1]) if word in flags]
    return values + [word.split("=", 1)[1] for word in words if word.split("=", 1)[0] in flags and "=" in word]


def container_env(config: dict, head: bool) -> dict[str, str]:
    return dict(value.partition("=")[::2] for value in flag_values(docker_run_words(config, head), "-e", "--env"))


def worker_host_path(config: dict, path: str) -> str:
    """Where Ray puts a `cluster_synced_files` path on a worker's host (docker clusters).

    The head's NodeUpdater syncs each path to the same path with docker_mount_if_possible=True;
    Ray's DockerCommandRunner then writes it under its host mount location, not into the container.
    """
    try:
        from ray.autoscaler._private.command_runner import DockerCommandRunner
    except ImportError:
        pytest.skip("this Ray has no ray.autoscaler._private.command_runner")
    runner = DockerCommandRunner(config["docker"], log_prefix="", node_id="worker", provider=None,
                                 auth_config=config["auth"], cluster_name=config["cluster_name"],
                                 process_runner=None, use_internal_ip=True)
    synced = []

    class HostShell:  # records what would run on the worker's host
        ssh_user, cluster_name = config["auth"]["ssh_user"], config["cluster_name"]

        def run(self, cmd, **kwargs):
            pass

        def run_rsync_up(self, source, target, options=None):
            synced.append(target)

    runner.ssh_command_runner = HostShell()
    runner._check_container_status = lambda: False  # a new worker: no container yet
    runner.run_rsync_up(path, path, options={"docker_mount_if_possible": True})
    (target,) = synced
    return target


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=rel)
def test_launcher_dashboard_listens_on_the_heads_loopback(path):
    """The dashboard serves the Jobs API, which runs any code: `ray dashboard FILE` tunnels to it."""
    config = load_one(path)
    hosts = re.findall(r"--dashboard-host[= ](\S+)", " ".join(config["head_start_ray_commands"]))
    assert hosts and set(hosts) <= LOOPBACK, f"{rel(path)}: --dashboard-host {hosts or 'missing'}; want 127.0.0.1"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=rel)
def test_launcher_turns_ray_token_auth_on_for_head_and_workers(path):
    config = load_one(path)
    for head, commands in ((True, "head_start_ray_commands"), (False, "worker_start_ray_commands")):
        env = container_env(config, head)
        start = " ".join(config[commands])
        assert env.get("RAY_AUTH_MODE") == "token" or "RAY_AUTH_MODE=token" in start, \
            f"{rel(path)}: the {'head' if head else 'workers'} must run with RAY_AUTH_MODE=token"
        assert env.get("RAY_AUTH_MODE", "token") == "token" and "RAY_AUTH_MODE=disabled" not in start
    assert not re.search(r"\bRAY_AUTH_TOKEN\b\s*[=:]", path.read_text()), f"{rel(path)}: a literal Ray token"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=rel)
def test_launcher_token_is_made_on_the_head_and_reaches_every_worker(path, monkeypatch):
    config = load_one(path)
    generate = [c for c in config["head_setup_commands"] if re.search(r"\bray get-auth-token\b.*--generate", c)]
    assert generate, f"{rel(path)}: head_setup_commands must generate the token (ray get-auth-token --generate)"
    assert all(re.search(r">\s*/dev/null", c) for c in generate), \
        f"{rel(path)}: `ray get-auth-token` prints the token: send it to /dev/null, not into `ray up`'s output"

    # Where `ray get-auth-token --generate` saves it on the head, whose autoscaler expands
    # cluster_synced_files there too.
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    monkeypatch.setenv("HOME", HEAD_HOME)
    token_path = str(_get_default_token_path())
    synced = [os.path.expanduser(p) for p in config.get("cluster_synced_files", [])]
    assert token_path in synced, f"{rel(path)}: cluster_synced_files must copy {token_path} to the workers"

    # The worker's container sees that host file where its RAY_AUTH_TOKEN_PATH says.
    host_path = worker_host_path(config, token_path)
    words = docker_run_words(config, head=False)
    env = container_env(config, head=False)
    assert "RAY_AUTH_TOKEN_PATH" in env, f"{rel(path)}: workers need RAY_AUTH_TOKEN_PATH (their ~/.ray has no token)"
    seen_at = []
    for volume in flag_values(words, "-v", "--volume"):
        source, target = volume.split(":")[:2]
        if host_path.startswith(source.rstrip("/") + "/"):
            seen_at.append(posixpath.join(target, posixpath.relpath(host_path, source)))
    assert env["RAY_AUTH_TOKEN_PATH"] in seen_at, \
        f"{rel(path)}: the head's token lands on the worker host at {host_path}, mounted at {seen_at or 'nowhere'}"


def k8s_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=rel)
def test_kuberay_token_auth_and_a_dashboard_inside_the_cluster(path):
    for obj in load_docs(path):
        spec = cluster_spec(obj)
        # KubeRay generates the token into a Secret and gives it to every Ray container.
        assert (spec.get("authOptions") or {}).get("mode") == "token", f"{rel(path)}: authOptions: {{mode: token}}"
        for container in containers_of(obj):
            env = k8s_env(container)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", \
                f"{rel(path)} {container['name']}: RAY_AUTH_MODE=token (fails closed under an operator without authOptions)"
            token = env.get("RAY_AUTH_TOKEN")
            assert token is None or "secretKeyRef" in token.get("valueFrom", {}), f"{rel(path)}: a literal Ray token"

        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), \
            f"{rel(path)}: the head Service (dashboard, Jobs API) stays inside the cluster"
        # KubeRay makes an absent dashboard-host 0.0.0.0.
        host = head["rayStartParams"].get("dashboard-host")
        if obj["kind"] == "RayJob":
            # The operator polls the job, and the submitter submits it, through the head Service.
            assert host in POD_ADDRESS, f"{rel(path)}: dashboard-host {host}; want the pod's address"
        else:
            assert host in LOOPBACK | POD_ADDRESS, f"{rel(path)}: dashboard-host {host}"
        if host in POD_ADDRESS:
            pod_ip = k8s_env(head["template"]["spec"]["containers"][0]).get("POD_IP", {})
            assert pod_ip.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP", \
                f"{rel(path)}: dashboard-host {host} needs POD_IP from status.podIP on the head container"


def test_kuberay_files_ask_for_an_operator_with_auth_options():
    """authOptions came with KubeRay 1.5.1; an older CRD drops it."""
    for path in KUBERAY_FILES:
        match = re.search(r"KubeRay operator >= (\d+)\.(\d+)\.(\d+)", path.read_text())
        assert match and tuple(map(int, match.groups())) >= (1, 5, 1), f"{rel(path)}: name KubeRay >= 1.5.1"


def env_file(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def compose_interpolate(text: str, env: dict[str, str]) -> str:
    """docker compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""
    missing = []

    def value(match):
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name") or match.group("bare"), match.group("op"), match.group("arg")
        current = env.get(name)
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            missing.append(name)
            return ""
        if op == ":-" and not current or op == "-" and current is None:
            return arg
        assert op in (None, ":-", "-", ":?", "?"), f"unhandled ${{{name}{op}...}}"
        return current or ""

    out = re.sub(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)", value, text)
    if missing:
        raise ValueError(f"required variables unset: {sorted(set(missing))}")
    return out


def test_mlflow_compose_needs_every_secret_and_listens_on_loopback():
    raw = COMPOSE.read_text()
    example = env_file(ENV_EXAMPLE)
    secrets = {name for name in example if SECRET_NAME.search(name)}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= secrets

    # Every use of a secret variable is a required one, so compose stops while it is unset.
    for name, op in re.findall(r"\$\{(\w+)(:?[-?+])?", raw):
        if SECRET_NAME.search(name):
            assert op == ":?", f"docker-compose.yaml: ${{{name}{op}...}}; use ${{{name}:?message}}"
    raw_services = yaml.safe_load(raw)["services"]
    for name, service in raw_services.items():
        environment = service.get("environment") or {}
        assert isinstance(environment, dict), f"{name}: write environment as a mapping"
        for key, val in environment.items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(val)), f"{name}: {key} must come from a required variable"

    # env.example copied as it is (empty passwords): compose refuses.
    with pytest.raises(ValueError, match="required variables unset") as unset:
        compose_interpolate(raw, example)
    assert all(name in str(unset.value) for name in secrets)

    # Filled in, MLFLOW_BIND_ADDRESS left empty: every published port is on this VM's loopback.
    filled = {key: val or (f"{key.lower()}-generated" if key in secrets else val) for key, val in example.items()}
    services = yaml.safe_load(compose_interpolate(raw, filled))["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            parts = str(port).rsplit(":", 2)
            assert len(parts) == 3 and parts[0] in LOOPBACK, f"{name} publishes {port} on every interface"
    assert services["mlflow"]["ports"], "the MLflow server publishes its port"

    mlflow_server = services["mlflow"]
    assert server_command(mlflow_server["command"]).get("--app-name") == "basic-auth"
    env, postgres = mlflow_server["environment"], services["postgres"]["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] and env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    # The basic-auth app's user store (basic_auth.ini: postgresql://) is the compose Postgres.
    assert env["PGHOST"] == "postgres" and (env["PGUSER"], env["PGPASSWORD"], env["PGDATABASE"]) == \
        (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])


def test_mlflow_compose_config_with_docker(tmp_path):
    """`docker compose config` agrees, where docker compose exists."""
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose here")
    example = env_file(ENV_EXAMPLE)
    (tmp_path / "unfilled.env").write_text(ENV_EXAMPLE.read_text())
    (tmp_path / "filled.env").write_text("".join(
        f"{key}={val or (key.lower() + '-generated' if SECRET_NAME.search(key) else '')}\n" for key, val in example.items()))

    def config(env_file_path):
        return subprocess.run([docker, "compose", "-f", str(COMPOSE), "--env-file", str(env_file_path), "config",
                               "--format", "json"], capture_output=True, text=True, timeout=60)

    assert config(tmp_path / "unfilled.env").returncode != 0, "compose must refuse empty passwords"
    filled = config(tmp_path / "filled.env")
    assert filled.returncode == 0, filled.stderr
    for port in json.loads(filled.stdout)["services"]["mlflow"]["ports"]:
        assert port.get("host_ip") in LOOPBACK, port


def test_mlflow_kubernetes_runs_basic_auth_with_generated_secrets():
    (deployment,) = [o for _, o in MLFLOW_K8S if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert server_command(container["command"]).get("--app-name") == "basic-auth"
    assert not [o for _, o in MLFLOW_K8S if o["kind"] == "Secret"], \
        "a Secret in the manifest holds its password in the file: create it with kubectl instead"
    secrets = documented_secrets(MLFLOW_YAML)
    env = k8s_env(container)
    for var in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert not ref.get("optional"), f"{var}: a required Secret key"
        generated = secrets.get(ref["name"], {}).get(ref["key"], "")
        assert re.fullmatch(r"\$\(openssl rand -(hex|base64) \d+\)", generated), \
            f"{var}: the header's `kubectl create secret` should generate {ref['name']}/{ref['key']}, not {generated!r}"

    # The auth app's user store (libpq's PG* variables) is the Postgres of the StatefulSet.
    (postgres,) = [c for _, o in MLFLOW_K8S if o["kind"] == "StatefulSet" for c in o["spec"]["template"]["spec"]["containers"]]
    pg_env = k8s_env(postgres)
    assert env["PGPASSWORD"]["valueFrom"] == pg_env["POSTGRES_PASSWORD"]["valueFrom"]
    assert (env["PGUSER"]["value"], env["PGDATABASE"]["value"]) == \
        (pg_env["POSTGRES_USER"]["value"], pg_env["POSTGRES_DB"]["value"])
    services = {f"{o['metadata']['name']}.{o['metadata']['namespace']}.svc" for _, o in MLFLOW_K8S if o["kind"] == "Service"}
    assert env["PGHOST"]["value"] in services

    for _, obj in MLFLOW_K8S:
        assert obj["kind"] != "Ingress", "no Ingress in front of MLflow"
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service {obj['metadata']['name']}"


def test_mlflow_image_carries_the_basic_auth_app_without_a_password(monkeypatch):
    instructions = dockerfile_instructions(MLFLOW_DOCKERFILE)
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert re.search(r"mlflow\[[^\]]*\bauth\b", runs), "pip install mlflow[auth] (Flask-WTF, for the basic-auth app)"
    env = dict(pair.split("=", 1) for word, args in instructions if word == "ENV" for pair in shlex.split(args))
    copies = {shlex.split(args)[-1]: shlex.split(args)[-2] for word, args in instructions if word == "COPY"}
    ini = MLFLOW_DOCKERFILE.parent / copies[env["MLFLOW_AUTH_CONFIG_PATH"]]
    cmd = json.loads(next(args for word, args in instructions if word == "CMD"))
    assert server_command(cmd).get("--app-name") == "basic-auth", "the image's own command runs the auth app too"

    # As MLflow reads it: no admin password in the file, a user store URI without one. Its
    # reader alone: the mlflow.server.auth package needs Flask-WTF, which the client lacks.
    from sqlalchemy.engine import make_url

    spec = importlib.util.find_spec("mlflow")
    reader = importlib.util.spec_from_file_location(
        "mlflow_auth_config", Path(spec.origin).parent / "server" / "auth" / "config.py")
    auth_config = importlib.util.module_from_spec(reader)
    reader.loader.exec_module(auth_config)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = auth_config.read_auth_config()
    assert config.admin_username and config.admin_password is None
    url = make_url(config.database_uri)
    assert url.get_backend_name() == "postgresql" and url.password is None, config.database_uri


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=rel)
def test_no_literal_secret_in_the_deploy_files(path):
    text = path.read_text()
    assert not re.search(r"change[-_]?me\b", text, re.I), f"{rel(path)}: a CHANGE-ME placeholder deploys as it is"
    for match in re.finditer(r"://([^/\s:@]+):([^@\s/]+)@", text):
        assert match.group(2).startswith("$"), f"{rel(path)}: a password in {match.group(0)}"
    assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text), f"{rel(path)}: a literal token or key"
    if path.suffix in (".yaml", ".yml"):
        for doc in load_docs(path):
            assert doc.get("kind") != "Secret", f"{rel(path)}: create Secrets with generated values, not in a file"
            for entry in env_entries(doc):
                if SECRET_NAME.search(str(entry.get("name", ""))):
                    assert "value" not in entry, f"{rel(path)}: {entry['name']} must come from a Secret"
    if path == ENV_EXAMPLE:
        filled = {key: val for key, val in env_file(path).items() if SECRET_NAME.search(key) and val}
        assert not filled, f"{rel(path)}: leave the secrets empty: {sorted(filled)}"


def env_entries(node):
    """Every Kubernetes env entry ({name, value | valueFrom}) in a document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from (e for e in value if isinstance(e, dict))
            yield from env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_entries(item)


def test_the_readme_shows_how_clients_get_in():
    readme = (CLUSTER / "README.md").read_text()
    for needed in ("ray dashboard cluster/aws.yaml", "kubectl -n ray port-forward svc/quantsweep-head-svc",
                   "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH", "ray rsync-down cluster/aws.yaml /home/ray/.ray/auth_token",
                   "get secret quantsweep", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                   "MLFLOW_BIND_ADDRESS"):
        assert needed in readme, f"cluster/README.md does not show {needed!r}"
