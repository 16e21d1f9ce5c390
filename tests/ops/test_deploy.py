"""deploy/: every manifest parses, sets only variables Kiln reads, and its names and ports agree."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from configs import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
# Read by libraries Kiln uses, not by Settings: s3fs (via fsspec) for the bucket.
THIRD_PARTY_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FSSPEC_S3_ENDPOINT_URL",
                   "PROMETHEUS_MULTIPROC_DIR", "WEB_CONCURRENCY"}


def settings_env_names() -> set[str]:
    """The names Settings.from_env reads."""
    return set(Settings().env())


def gunicorn_env_names() -> set[str]:
    """The variables deploy/gunicorn.conf.py reads."""
    text = (DEPLOY / "gunicorn.conf.py").read_text()
    return set(re.findall(r"""environ(?:\.get\(|\[|\.setdefault\()\s*["']([A-Z0-9_]+)["']""", text))


def docs() -> list[tuple[Path, dict]]:
    out = []
    for path in MANIFESTS:
        out += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def k8s(kind: str) -> list[dict]:
    return [d for _, d in docs() if d.get("kind") == kind]


def kiln_compose_services() -> dict:
    return {n: s for n, s in compose()["services"].items() if str(s.get("image", "")).startswith("kiln")}


def kiln_containers() -> list[dict]:
    out = []
    for d in k8s("Deployment") + k8s("Job") + k8s("StatefulSet"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["image"].startswith("kiln"):
                out.append(c)
    return out


def configmap_data(name: str) -> dict:
    found = [d for d in k8s("ConfigMap") + k8s("Secret") if d["metadata"]["name"] == name]
    assert found, f"no ConfigMap/Secret named {name}"
    return found[0].get("data") or found[0].get("stringData") or {}


def container_env(c: dict) -> dict[str, str]:
    env = {}
    for ref in c.get("envFrom", []):
        source = ref.get("configMapRef") or ref.get("secretRef")
        env.update(configmap_data(source["name"]))
    for item in c.get("env", []):
        env[item["name"]] = item.get("value", "<from>")
    return env


def test_every_manifest_parses():
    assert len(MANIFESTS) >= 9, [p.name for p in MANIFESTS]  # compose + 8 k8s files: catch a lost glob
    kinds = {d["kind"] for _, d in docs() if "kind" in d}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"} <= kinds


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_kiln_containers_set_only_variables_kiln_reads(where):
    known = settings_env_names() | gunicorn_env_names() | THIRD_PARTY_ENV
    envs = ([s["environment"] for s in kiln_compose_services().values()] if where == "compose"
            else [container_env(c) for c in kiln_containers()])
    assert envs
    for env in envs:
        unknown = sorted(set(env) - known)
        assert not unknown, f"{where}: Kiln reads none of {unknown}"
        # and values parse: a typo like KILN_MAX_ATTEMPTS=three fails here, not at start-up
        kiln_only = {k: str(v) for k, v in env.items() if k in settings_env_names() and "${" not in str(v)}
        Settings.from_env(kiln_only)


def test_compose_hosts_and_ports_match_services():
    c = compose()
    services = c["services"]
    for name, svc in kiln_compose_services().items():
        env = svc["environment"]
        assert urlsplit(env["REDIS_URL"]).hostname in services
        assert urlsplit(env["DATABASE_URL"].replace("${POSTGRES_PASSWORD:-kiln}", "pw")).hostname in services
        assert urlsplit(env["FSSPEC_S3_ENDPOINT_URL"]).hostname in services
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    web = services["web"]
    port = web["environment"]["KILN_BIND"].rsplit(":", 1)[1]
    assert any(str(p).endswith(f":{port}") for p in web["ports"])
    assert "deploy/gunicorn.conf.py" in web["command"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_k8s_hosts_ports_and_volumes_match():
    services = {d["metadata"]["name"]: d for d in k8s("Service")}
    config = configmap_data("kiln-config") | configmap_data("kiln-secrets")
    for key, port in (("REDIS_URL", 6379), ("DATABASE_URL", 5432)):
        url = urlsplit(config[key])
        assert url.hostname in services, f"{key} host {url.hostname} is no Service"
        assert url.port == port and port in [p["port"] for p in services[url.hostname]["spec"]["ports"]]
    web = next(d for d in k8s("Deployment") if d["metadata"]["name"] == "kiln-web")
    container = web["spec"]["template"]["spec"]["containers"][0]
    port = int(container_env(container)["KILN_BIND"].rsplit(":", 1)[1])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    target = services["kiln-web"]["spec"]["ports"][0]["targetPort"]
    assert named.get(target, target) == port
    assert services["kiln-web"]["spec"]["selector"] == web["spec"]["template"]["metadata"]["labels"]
    worker = next(d for d in k8s("Deployment") if d["metadata"]["name"] == "kiln-worker")
    limits = worker["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    for name in ("redis", "postgres"):
        sts = next(d for d in k8s("StatefulSet") if d["metadata"]["name"] == name)
        assert sts["spec"]["volumeClaimTemplates"], f"{name} has no PersistentVolumeClaim"
        assert sts["spec"]["serviceName"] in services


def test_dockerfile_env_and_port():
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env_lines = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("ENV ")]
    names = {pair.split("=", 1)[0] for line in env_lines for pair in line.split()}
    kiln_names = {n for n in names if n.startswith("KILN_")}
    assert "KILN_HOME" in kiln_names and "KILN_BIND" in kiln_names
    assert kiln_names <= settings_env_names() | gunicorn_env_names(), kiln_names
    bind = re.search(r"KILN_BIND=\S+:(\d+)", text)[1]
    assert re.search(rf"^EXPOSE {bind}$", text, re.M)
    assert "deploy/gunicorn.conf.py" in text


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())["resources"])
    present = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


PLAIN = {"REDIS_URL": "redis_url", "DATABASE_URL": "database_url", "STORAGE_URL": "storage_url"}


def documented_settings() -> set[str]:
    """The variables the settings tables of README.md and deploy/README.md list (first cell of a row)."""
    names = set()
    for path in (ROOT / "README.md", DEPLOY / "README.md"):
        for line in path.read_text().splitlines():
            if line.startswith("| `"):
                names |= set(re.findall(r"`([A-Z][A-Z0-9_]*)`", line.split("|")[1]))
    return names


def field_of(name: str) -> str:
    """REDIS_URL -> redis_url, KILN_MAX_ATTEMPTS -> max_attempts (the documented naming rule)."""
    return PLAIN.get(name) or name.removeprefix("KILN_").lower()


def other_value(default) -> str:
    if isinstance(default, bool):
        return "0" if default else "1"
    if isinstance(default, (int, float)):
        return str(default + 7)
    return f"/elsewhere/{default or 'x'}"


def test_every_documented_setting_is_read_by_from_env():
    """Each documented variable, set to a non-default value, changes the field the naming rule says."""
    documented = documented_settings()
    assert {"REDIS_URL", "DATABASE_URL", "STORAGE_URL", "KILN_HOME", "KILN_AUTH_ENABLED"} <= documented
    fields = {f.name for f in dataclasses.fields(Settings)}
    default = Settings()
    for name in sorted(documented):
        assert name.startswith("KILN_") or name in PLAIN, f"{name} is neither KILN_* nor a plain URL"
        assert field_of(name) in fields, f"{name} is documented but Settings has no field {field_of(name)}"
        changed = Settings.from_env({name: other_value(getattr(default, field_of(name)))})
        assert getattr(changed, field_of(name)) != getattr(default, field_of(name)), f"from_env ignores {name}"


def test_every_setting_round_trips_through_its_variable():
    """KILN_<FIELD> (or the plain URL name) for every field: from_env(env()) gives the same Settings."""
    default = Settings()
    names = {f.name: next((k for k, v in PLAIN.items() if v == f.name), f"KILN_{f.name.upper()}")
             for f in dataclasses.fields(Settings)}
    env = {name: other_value(getattr(default, field)) for field, name in names.items()}
    changed = Settings.from_env(env)
    assert all(getattr(changed, f) != getattr(default, f) for f in names), "a field ignored its variable"
    assert Settings.from_env(changed.env()) == changed


@pytest.mark.parametrize("bind, reuse", [("127.0.0.1:8000", True), ("[::1]:8000", True), ("unix:/tmp/kiln.sock", False)])
def test_web_processes_each_listen_on_a_tcp_port(monkeypatch, tmp_path, bind, reuse):
    """SO_REUSEPORT on TCP: each web process gets its own listening socket and the kernel spreads new
    connections across them. On one shared socket, whichever process woke first took the next
    connection: 30 of 32 kept-alive clients once landed on one process, whose 16 threads then
    served them in turn while the other process idled. A unix socket cannot be shared that way."""
    import runpy

    monkeypatch.setenv("KILN_BIND", bind)
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prometheus"))
    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    assert conf["bind"] == bind and conf["reuse_port"] is reuse
