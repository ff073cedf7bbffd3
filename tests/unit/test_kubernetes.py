"""deploy/kubernetes/ stays valid and true to httptp.

Every manifest is checked against the Kubernetes API schemas that
kubernetes-validate bundles (offline, strict: an unknown field is an error)
for the oldest version docs/kubernetes.md states and the newest bundled one.
Each scenario's ConfigMap must pass the real ``httptp -checkConfig``, and the
Deployment must agree with it: probe ports and paths with -expvarAddr, ports
with -in, the stop budget with -gracefulTimeout, the CPU request with
-workers, mounts with the files the config names.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from httptp.config import load_config, read_config_file
from httptp.netaddr import parse_address
from httptp.settings import comma_list
from tests.helpers import HTTPTP

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the test extra: make venv")

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
SCENARIOS = sorted(p.name for p in KUBE.iterdir() if p.is_dir())
MANIFESTS = sorted(KUBE.glob("*/*.yaml"))
# The oldest Kubernetes version the manifests are stated to work with
# (docs/kubernetes.md); they are also checked against the newest bundled one.
K8S_MIN = "1.29"
# Names that only resolve inside a cluster or at the partner: checkConfig
# gets localhost instead, which resolves anywhere (discovery resolves -out at start).
CLUSTER_NAME = re.compile(r"[\w.-]+\.svc\.cluster\.local|[\w.-]+\.example\b")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _scenario(name: str) -> dict[str, list[dict]]:
    """{kind: [objects]} of one scenario directory."""
    kinds: dict[str, list[dict]] = {}
    for path in sorted((KUBE / name).glob("*.yaml")):
        for doc in _docs(path):
            kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def _one(kinds: dict, kind: str, name: str | None = None) -> dict:
    found = [d for d in kinds.get(kind, []) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"want one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod(kinds: dict) -> dict:
    return _one(kinds, "Deployment")["spec"]["template"]["spec"]


def _container(kinds: dict) -> dict:
    (container,) = [c for c in _pod(kinds)["containers"] if c["name"] == "httptp"]
    return container


def _config_path(container: dict) -> str:
    (arg,) = [a for a in container["args"] if a.startswith("-config=")]
    return arg.split("=", 1)[1]


def _conf_text(kinds: dict) -> str:
    """The httptp.conf the Deployment mounts at -config."""
    pod, container = _pod(kinds), _container(kinds)
    path = _config_path(container)
    mount = _mount_of(container, path)
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = _one(kinds, "ConfigMap", volume["configMap"]["name"])
    return cm["data"][path[len(mount["mountPath"]):].lstrip("/")]


def _mount_of(container: dict, path: str) -> dict:
    mounts = [m for m in container.get("volumeMounts", [])
              if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no mounted volume of the container"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def _config(kinds: dict, tmp_path: Path):
    conf = tmp_path / "httptp.conf"
    conf.write_text(CLUSTER_NAME.sub("localhost", _conf_text(kinds)))
    return conf, load_config([f"-config={conf}"], {})


def _port(container: dict, port) -> int:
    """A probe's or Service's port: a number or the name of a container port."""
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return found


# ----------------------------------------------------------------- schemas

def test_the_minimum_version_is_bundled():
    assert K8S_MIN in {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}, \
        f"kubernetes-validate no longer bundles {K8S_MIN}: raise K8S_MIN here and in docs/kubernetes.md"


@pytest.mark.parametrize("version", [K8S_MIN, "newest"])
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_manifest_is_valid(path, version):
    if version == "newest":
        version = kubernetes_validate.latest_version()
    docs = _docs(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{path.name}: {e.message}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_is_complete_and_in_one_namespace(scenario):
    kinds = _scenario(scenario)
    for kind in ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget"):
        assert kinds.get(kind), f"{scenario} has no {kind}"
    namespaces = {d["metadata"].get("namespace") for docs in kinds.values() for d in docs}
    assert len(namespaces) == 1 and None not in namespaces, namespaces


def test_both_seed_scenarios_are_there():
    assert set(SCENARIOS) >= {"teleport-in", "teleport-out"}


# -------------------------------------------------- the config is httptp's

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_configmap_passes_check_config(scenario, tmp_path):
    """The real command, certificates included: the mounted TLS paths are
    replaced by certificates made here (trustme)."""
    trustme = pytest.importorskip("trustme")
    text = CLUSTER_NAME.sub("localhost", _conf_text(_scenario(scenario)))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "tls.crt")
    cert.private_key_pem.write_to_path(tmp_path / "tls.key")
    text = re.sub(r"(?m)^(\s*\w+\s*=\s*)/\S*/(tls\.(?:crt|key))$", rf"\g<1>{tmp_path}/\2", text)
    conf = tmp_path / "httptp.conf"
    conf.write_text(text)
    run = subprocess.run([HTTPTP, f"-config={conf}", "-checkConfig"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "configuration OK" in run.stdout, run.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_and_scrape_target_the_stats_server(scenario, tmp_path):
    kinds = _scenario(scenario)
    _, cfg = _config(kinds, tmp_path)
    container = _container(kinds)
    host, _, port = cfg.expvar_addr.rpartition(":")
    assert host in ("", "0.0.0.0", "[::]"), \
        f"-expvarAddr={cfg.expvar_addr}: the kubelet probes the pod's address, not localhost"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert _port(container, get["port"]) == int(port), probe
    def budget(probe):      # seconds of failures before the kubelet acts
        return container[probe]["periodSeconds"] * container[probe]["failureThreshold"]
    assert budget("readinessProbe") < budget("livenessProbe") <= budget("startupProbe"), \
        "readiness should act before liveness, and a start may take longer than either"
    notes = _one(kinds, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == port
    assert notes["prometheus.io/path"] == "/prometheus"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_listener_port_is_exposed_by_the_service(scenario, tmp_path):
    kinds = _scenario(scenario)
    _, cfg = _config(kinds, tmp_path)
    container = _container(kinds)
    ports = {p["containerPort"] for p in container["ports"]}
    assert cfg.listen.port in ports and cfg.listen.host in ("", "0.0.0.0", "::")
    service = _one(kinds, "Service", _one(kinds, "Deployment")["metadata"]["name"])
    assert [_port(container, p["targetPort"]) for p in service["spec"]["ports"]] == [cfg.listen.port]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_termination_grace_covers_the_drain(scenario, tmp_path):
    """The kubelet sends KILL terminationGracePeriodSeconds after the pod starts
    terminating, preStop hook included: TERM comes after the hook."""
    kinds = _scenario(scenario)
    _, cfg = _config(kinds, tmp_path)
    pre_stop = _container(kinds)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = _pod(kinds)["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + cfg.graceful_timeout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_workers_match_the_cpu_request(scenario, tmp_path):
    """-workers=auto counts the CPU limit (none here: the node's CPUs), not the request."""
    kinds = _scenario(scenario)
    _, cfg = _config(kinds, tmp_path)
    assert "workers" in _conf_text(kinds)
    resources = _container(kinds)["resources"]
    assert cfg.workers == int(resources["requests"]["cpu"])
    assert "memory" in resources["limits"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_files_the_config_names_are_mounted(scenario, tmp_path):
    kinds = _scenario(scenario)
    _, cfg = _config(kinds, tmp_path)
    container = _container(kinds)
    files = [*cfg.in_tls_cert, *cfg.in_tls_key, cfg.in_tls_client_ca, cfg.out_tls_ca,
             cfg.out_tls_cert, cfg.out_tls_key]
    for path in filter(None, files):
        _mount_of(container, path)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_selectors_match_the_pods(scenario):
    kinds = _scenario(scenario)
    deployment = _one(kinds, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [deployment["spec"]["selector"]["matchLabels"],
                 _one(kinds, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                 _one(kinds, "Service", deployment["metadata"]["name"])["spec"]["selector"]]
    for selector in selectors:
        assert selector.items() <= labels.items(), selector
    assert deployment["spec"]["replicas"] >= 2, "a PodDisruptionBudget of one pod blocks drains"


# ------------------------------------------------------------ hardening

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_is_hardened(scenario):
    kinds = _scenario(scenario)
    pod, container = _pod(kinds), _container(kinds)
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] and sc["runAsNonRoot"]
    assert pod_sc["runAsUser"] == DOCKERFILE_UID and pod_sc["runAsGroup"] == DOCKERFILE_GID
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    # Service variables would land in the HTTPTP_* namespace of the settings.
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    kinds_of = {v["name"]: v for v in pod["volumes"]}
    assert all("emptyDir" in kinds_of[m["name"]] for m in writable), writable


DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
_user = re.search(r"(?m)^USER (\d+):(\d+)\s*$", DOCKERFILE)
DOCKERFILE_UID = int(_user.group(1)) if _user else None
DOCKERFILE_GID = int(_user.group(2)) if _user else None


def test_dockerfile_runs_as_a_numeric_non_root_user():
    """runAsNonRoot can only check a numeric USER."""
    assert _user, "the Dockerfile needs USER uid:gid with numbers"
    assert DOCKERFILE_UID != 0 and DOCKERFILE_GID != 0
    assert f"--uid {DOCKERFILE_UID}" in DOCKERFILE and f"--gid {DOCKERFILE_GID}" in DOCKERFILE


# ------------------------------------------- per-address balancing (teleport-in)

def test_teleport_in_balances_over_a_headless_service(tmp_path):
    """-out names a headless Service of this namespace, so its name resolves to
    every pod; the port is the pods' own (no Service port mapping on that path)."""
    kinds = _scenario("teleport-in")
    raw = read_config_file(str(_write(tmp_path, _conf_text(kinds))))
    (out,) = comma_list(raw["out"][0])
    upstream = parse_address(out, raw["outType"][0])
    name, namespace = upstream.host.split(".")[:2]
    assert upstream.host == f"{name}.{namespace}.svc.cluster.local"
    service = _one(kinds, "Service", name)
    assert service["metadata"]["namespace"] == namespace
    assert service["spec"]["clusterIP"] == "None"
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [upstream.port]
    assert [p["port"] for p in service["spec"]["ports"]] == [upstream.port]


def test_teleport_in_keeps_the_partner_address():
    """-inAllowIP sees the partner's address only with externalTrafficPolicy: Local."""
    kinds = _scenario("teleport-in")
    service = _one(kinds, "Service", "httptp-teleport-in")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "httptp.conf"
    path.write_text(text)
    return path


def test_docs_name_every_file_and_the_stated_version():
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    assert f"Kubernetes {K8S_MIN}" in doc
    for path in MANIFESTS:
        assert f"`{path.name}`" in doc, f"docs/kubernetes.md does not describe {path.name}"
    for scenario in SCENARIOS:
        assert f"`{scenario}/`" in doc, f"docs/kubernetes.md does not describe {scenario}/"
