"""The deploy files under cluster/ parse, validate and agree with each other, offline.

Nothing here starts a container, a cluster or a cloud call: the cluster-launcher files are
checked against the schema Ray ships (and Ray's own config checks), the Kubernetes
manifests by their structure, the Dockerfiles by their instructions.
"""

from __future__ import annotations

import json
import re
import shlex
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
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head, \
        f"{rel(path)}: the head must serve the dashboard (Jobs API) beyond localhost"
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
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
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
    for kind in ("Namespace", "Secret", "StatefulSet", "Service", "Deployment"):
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
    secrets = {name: set(s.get("stringData", {})) | set(s.get("data", {})) for name, s in by_kind["Secret"].items()}
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
