"""`cluster/`: every `ray up` config and KubeRay manifest, checked as far as it can be without a cluster.

A manifest is only exercised when someone deploys it, so the checks here go through the real parsers:
Ray's own cluster-config loader and schema (`prepare_config` + `validate_config`), Ray's `ray start`
command (click) for every `ray start` line and `rayStartParams`, and streamgen's own argparse parser for
every `streamgen serve` command line. KubeRay objects are checked for the structure the operator needs
(ray.io/v1, head + worker groups, string rayStartParams, GPU requests, images, ports) and for agreement
between the pieces (the Service's target port, the Serve app's module and settings, the Ray version).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.scripts.scripts import start as ray_start_command

from streamgen.cli import build_parser
from streamgen.serve.ice import is_loopback

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_UP = sorted(CLUSTER.glob("*.yaml"))  # `ray up` configs
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")
SEPARATORS = {";", "&&", "||", "|", "&"}


def name(path: Path) -> str:
    return str(path.relative_to(CLUSTER))


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{name(path)}: every YAML document must be a mapping"
    return docs


def invocations(script: str, *program: str) -> list[list[str]]:
    """The argument lists a shell script runs `program` (e.g. "streamgen", "serve") with: the script is cut
    into simple commands at ; && || | &, redirections are dropped, and a prefix (exec, nohup, …) is skipped."""
    script = re.sub(r"(?<![^\s;&|])\d+(?=[<>])", "", script)  # `2>&1`: the 2 names a file descriptor, not an argument
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    redirect = False
    for token in lexer:
        if redirect:
            redirect = False
        elif token in SEPARATORS:
            commands.append([])
        elif token[0] in "<>":
            redirect = True  # the next token is the target
        else:
            commands[-1].append(token)
    n = len(program)
    return [cmd[i + n:] for cmd in commands for i in range(len(cmd) - n + 1) if tuple(cmd[i:i + n]) == program]


def serve_args(argv: list[str]) -> argparse.Namespace:
    """`streamgen serve ARGV` through the real CLI parser (what `streamgen serve --help` documents). Flags
    must be spelled out: argparse takes unambiguous prefixes, which a later flag can make ambiguous."""
    parser = build_parser()
    [serve] = [a.choices["serve"] for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    abbreviated = [t for t in argv if t.startswith("--") and t.partition("=")[0] not in serve._option_string_actions]
    assert not abbreviated, f"`streamgen serve` has no flags {abbreviated} (abbreviated?)"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(["serve", *argv])
        except SystemExit:
            pytest.fail(f"the streamgen CLI refuses `streamgen serve {shlex.join(argv)}`:\n{err.getvalue()}")


def ray_start_args(argv: list[str]) -> dict[str, Any]:
    """`ray start ARGV` through Ray's own click command (parsed and type-checked, not run)."""
    try:
        return ray_start_command.make_context("ray start", list(argv)).params
    except click.UsageError as exc:
        pytest.fail(f"Ray refuses `ray start {shlex.join(argv)}`: {exc}")


def ray_start_params(params: dict[str, Any], head: bool) -> dict[str, Any]:
    """KubeRay's rayStartParams as the `ray start` command the operator builds (`--key=value` in a shell)."""
    assert all(isinstance(v, str) for v in params.values()), f"rayStartParams values must be strings: {params}"
    flags = [shlex.split(f"--{key}={value}")[0] for key, value in params.items()]
    return ray_start_args(["--head", *flags] if head else ["--address=head:6379", *flags])


def shell_of(container: dict[str, Any]) -> str:
    return " ".join([*container.get("command", []), *container.get("args", [])])


def ray_version_of_image() -> str:
    """The Ray version cluster/Dockerfile builds on; `ray[serve]` in it must be the same."""
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)", text, re.M)
    serve = re.search(r"ray\[serve\]==(\d+\.\d+\.\d+)", text)
    assert base and serve and base[1] == serve[1], "cluster/Dockerfile: base image and ray[serve] must be one Ray version"
    return base[1]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def pods(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Pod specs of a RayCluster / RayService (head first); none for other kinds."""
    if not doc["apiVersion"].startswith("ray.io/"):
        return []
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]


def mount(container: dict[str, Any], path: str) -> str | None:
    return next((m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == path), None)


# --- every file -------------------------------------------------------------------------------------
def test_the_shell_splitting_the_checks_rely_on() -> None:
    script = "ulimit -n 65536; nohup streamgen serve --port 8080 --model \"$M\" --threads 2 >/tmp/log 2>&1 & echo $! > /tmp/p"
    assert invocations(script, "streamgen", "serve") == [["--port", "8080", "--model", "$M", "--threads", "2"]]
    assert invocations("until ray status; do sleep 2; done; exec streamgen serve --backend ray", "streamgen", "serve") \
        == [["--backend", "ray"]]
    assert invocations("ray stop", "ray", "start") == []


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.y*ml")), ids=name)
def test_every_manifest_parses_and_is_checked(path: Path) -> None:
    docs = documents(path)
    assert path in RAY_UP or path in KUBERAY, f"{name(path)} is neither a `ray up` config nor under kuberay/"
    assert name(path) in (CLUSTER / "README.md").read_text(), f"cluster/README.md does not list {name(path)}"
    for doc in docs if path in KUBERAY else []:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc


def test_one_image_everywhere() -> None:
    assert RAY_UP and KUBERAY
    images = {c["image"] for path in KUBERAY for doc in documents(path) for pod in pods(doc) for c in pod["containers"]}
    images |= {documents(path)[0]["docker"]["image"] for path in RAY_UP}
    assert len(images) == 1, f"the manifests name different images: {sorted(images)}"
    [image] = images
    assert re.fullmatch(r"[\w.\-/]+:[\w.\-]+", image) and not image.endswith(":latest"), image


# --- ray up -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", RAY_UP, ids=name)
def test_ray_up_config(path: Path) -> None:
    [config] = documents(path)
    assert config.get("cluster_name") and config.get("provider", {}).get("type")
    prepared = prepare_config(copy.deepcopy(config))  # Ray's loader: defaults; the local provider's node type
    validate_config(prepared)  # Ray's schema; head_node_type among the node types; max_workers ≥ Σ min_workers
    assert prepared["head_node_type"] in prepared["available_node_types"]
    commands = {key: config.get(key) or [] for key in COMMAND_LISTS}

    [head_start] = [ray_start_args(a) for c in commands["head_start_ray_commands"] for a in invocations(c, "ray", "start")]
    workers_start = [ray_start_args(a) for c in commands["worker_start_ray_commands"] for a in invocations(c, "ray", "start")]
    assert head_start["head"] and workers_start and all(s["address"] and not s["head"] for s in workers_start)

    if config["provider"]["type"] == "local":  # ray up refuses node types here: Ray detects each machine's GPUs
        assert "--gpus all" in config["docker"]["run_options"], "the containers do not get the machines' GPUs"
        node_gpus = [1.0]
    else:
        types, head_type = config["available_node_types"], config["head_node_type"]
        node_gpus = [t.get("resources", {}).get("GPU", 0) for n, t in types.items() if n != head_type]
        assert node_gpus and min(node_gpus) >= 1, f"worker node types without GPU resources: {types}"
        # The autoscaler hands a node type's resources to `ray start` (RAY_OVERRIDE_RESOURCES), overriding its
        # flags: a head started with --num-cpus=0 must declare CPU 0 too, or stage actors land on the head.
        assert types[head_type].get("resources", {}).get("CPU") == head_start["num_cpus"], types[head_type]

    # The server runs on the head (the Ray driver), after Ray is up there, reachable from outside, on Ray.
    head_scripts = commands["head_setup_commands"] + commands["head_start_ray_commands"]
    serves = [(i, a) for i, c in enumerate(head_scripts) for a in invocations(c, "streamgen", "serve")]
    assert len(serves) == 1, f"{name(path)}: the head must start `streamgen serve` once, found {len(serves)}"
    [(at, argv)] = serves
    started_ray = [i for i, c in enumerate(head_scripts) if invocations(c, "ray", "start")]
    assert started_ray and at > started_ray[0], "`streamgen serve` must start after `ray start --head`"
    args = serve_args(argv)
    assert args.backend == "ray" and args.ray_address == "auto", (args.backend, args.ray_address)
    assert not is_loopback(args.host), f"the server binds {args.host}: unreachable from clients"
    assert 0 < args.ray_gpus <= max(node_gpus), f"--ray-gpus {args.ray_gpus} does not fit a worker node"


# --- KubeRay ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", KUBERAY, ids=name)
def test_kuberay_manifest(path: Path) -> None:
    docs = documents(path)
    [doc] = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayService"), (doc["apiVersion"], doc["kind"])
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray_version_of_image(), "rayVersion is not the Ray version of cluster/Dockerfile"

    head = spec["headGroupSpec"]
    head_params = ray_start_params(head["rayStartParams"], head=True)
    head_pod = head["template"]["spec"]
    ray_head = head_pod["containers"][0]  # KubeRay runs `ray start` in the first container
    assert ray_head["name"] == "ray-head" and ray_head["image"]
    head_ports = {p["containerPort"]: p.get("name") for c in head_pod["containers"] for p in c.get("ports", [])}
    assert 6379 in head_ports, "the head does not expose the GCS port"

    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
        params = ray_start_params(group["rayStartParams"], head=False)
        worker = group["template"]["spec"]["containers"][0]
        assert worker["image"]
        gpus = {kind: worker["resources"].get(kind, {}).get("nvidia.com/gpu") for kind in ("requests", "limits")}
        assert gpus["requests"] and gpus["requests"] >= 1 and gpus["requests"] == gpus["limits"], gpus  # k8s: equal
        assert params["num_gpus"] in (None, gpus["limits"]), "rayStartParams num-gpus differs from the pod's GPUs"

    if doc["kind"] == "RayCluster":  # the server: a `streamgen serve` container in the head pod
        serves = [(c, serve_args(a)) for c in head_pod["containers"] for a in invocations(shell_of(c), "streamgen", "serve")]
        assert len(serves) == 1, f"expected one `streamgen serve` in the head pod, found {len(serves)}"
        [(container, args)] = serves
        assert args.backend == "ray" and not is_loopback(args.host) and args.ray_gpus >= 1, args
        if container is not ray_head:
            # A Ray driver in another container of the head pod reaches the local raylet and object store
            # through the sockets under /tmp/ray of the ray-head container: that directory must be shared.
            shared = mount(container, "/tmp/ray")
            assert shared and shared == mount(ray_head, "/tmp/ray"), "the server container does not share /tmp/ray"
        server_port = args.port
    else:  # RayService: the server runs in a Serve replica from the app's import path
        serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        [app] = serve_config["applications"]
        module, _, attr = app["import_path"].partition(":")
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        assigned = {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
        assert attr in assigned, f"{module} defines no {attr!r}"
        env = app["runtime_env"]["env_vars"]
        unread = [k for k in env if k.startswith("STREAMGEN_") and f'"{k}"' not in source]
        assert not unread, f"{module} does not read {unread}"
        offered = json.loads(head_params["resources"])
        for deployment in app["deployments"]:
            wanted = deployment.get("ray_actor_options", {}).get("resources", {})
            assert set(wanted) <= set(offered), f"{deployment['name']} wants {wanted}; the head offers {offered}"
        server_port = int(env["STREAMGEN_PORT"])
    assert server_port in head_ports, f"no head container exposes the server's port {server_port}"

    head_labels = head["template"]["metadata"]["labels"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert any(set(s["spec"]["selector"].items()) <= set(head_labels.items())
               and any(p["targetPort"] in (server_port, head_ports[server_port]) for p in s["spec"]["ports"])
               for s in services), "no Service routes to the server in the head pod"
