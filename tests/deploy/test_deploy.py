"""Deployment assets agree with the code: metric names, dashboard, rules, compose, Helm chart, Dockerfile.

External tools are used when present and skipped otherwise (set TTA_REQUIRE_DEPLOY_TOOLS=1 to turn
those skips into failures):
- promtool (Debian package `prometheus`): rules, config, rule unit tests, dashboard PromQL syntax;
- helm, or the `helm-python-sdk` package (Helm's Go SDK through ctypes): lint and render the chart;
- docker compose v2 or docker-compose v1: `config` of the compose file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tta_bench.paths import REPO_ROOT as REPO
from tta_server.metrics import Metrics

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tta-drift.json"
RULES = DEPLOY / "prometheus" / "rules" / "tta.rules.yml"
RULES_TESTS = DEPLOY / "prometheus" / "tests" / "tta.rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = DEPLOY / "compose" / "compose.yml"
METRICS_MD = DEPLOY / "metrics.md"
MODELS_CONFIG = DEPLOY / "models.cifar10.yaml"
CHART = DEPLOY / "helm" / "tta-server"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

SERVER_SERVICES = ("tta-server-1", "tta-server-2")
SEVERITIES = {"critical", "warning", "info"}

METRIC_RE = re.compile(r"(?<![\w:])tta_[A-Za-z0-9_]+")
RECORD_RE = re.compile(r"(?<![\w:])tta:[A-Za-z0-9_:]+")
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("TTA_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(f"{reason} (TTA_REQUIRE_DEPLOY_TOOLS=1)")
    pytest.skip(reason)


def _succeeds(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True, timeout=60, check=False).returncode == 0


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


# --------------------------------------------------------------------------------------------------
# Metric names
# --------------------------------------------------------------------------------------------------


def _families() -> dict[str, str]:
    """Family name -> type, from the registry the server uses."""
    return {f.name: f.type for f in Metrics().registry.collect()}


def _documented_names() -> dict[str, str]:
    """The exported name of each family: counters with _total, histograms and gauges as is."""
    return {(f"{name}_total" if kind == "counter" else name): kind for name, kind in _families().items()}


def _queryable_names() -> set[str]:
    """Sample names a query can select: counters _total, histograms _bucket/_sum/_count, gauges."""
    out: set[str] = set()
    for name, kind in _families().items():
        if kind == "counter":
            out.add(f"{name}_total")
        elif kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            out.add(name)
    return out


def _identifiers(expr: str) -> tuple[set[str], set[str]]:
    """(tta_ metric names, tta: recording-rule names) in a PromQL expression, outside string literals."""
    bare = STRING_RE.sub('""', expr)
    return set(METRIC_RE.findall(bare)), set(RECORD_RE.findall(bare))


def test_metrics_names_cover_every_family() -> None:
    names = Metrics().names()
    assert _queryable_names() <= names
    assert {"tta_requests_total", "tta_state_store_up", "tta_bn_distance_bucket"} <= names


def test_identifier_parser_ignores_strings_and_separates_records() -> None:
    metrics, records = _identifiers(
        'sum by (model) (rate(tta_samples_total{job="tta_x", model=~"$model"}[5m]))'
        " / tta:samples:rate5m + tta_state_store_up"
    )
    assert metrics == {"tta_samples_total", "tta_state_store_up"}
    assert records == {"tta:samples:rate5m"}


# --------------------------------------------------------------------------------------------------
# Prometheus rules
# --------------------------------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def test_rules_use_only_existing_metrics() -> None:
    queryable, names, recorded = _queryable_names(), Metrics().names(), _recorded()
    for rule in _rules():
        metrics, records = _identifiers(rule["expr"])
        what = rule.get("record") or rule.get("alert")
        assert metrics <= names, f"{what}: unknown metrics {sorted(metrics - names)}"
        assert metrics <= queryable, f"{what}: not queryable as written {sorted(metrics - queryable)}"
        assert records <= recorded, f"{what}: undefined recording rules {sorted(records - recorded)}"


def test_recording_rule_names_follow_convention() -> None:
    recorded = [rule["record"] for rule in _rules() if "record" in rule]
    assert len(recorded) == len(set(recorded)), "duplicate recording rules"
    for name in recorded:
        assert re.fullmatch(r"tta:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_alerts_have_severity_summary_description_and_for() -> None:
    alerts = [rule for rule in _rules() if "alert" in rule]
    names = {rule["alert"] for rule in alerts}
    assert len(names) == len(alerts), "duplicate alert names"
    expected = {
        "TTAPredictionEntropyRising", "TTAFilteredShareSpike", "TTABNDistanceJump",
        "TTAServerErrorRateHigh", "TTARequestErrorRateHigh", "TTAStateStoreDown",
        "TTAStateConflictsHigh", "TTARequestLatencyP99High",
    }  # fmt: skip
    assert expected <= names, f"missing alerts {sorted(expected - names)}"
    for rule in alerts:
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
        assert rule.get("for"), f"{rule['alert']} has no `for`"


def test_entropy_alert_compares_short_window_with_long_baseline() -> None:
    alert = next(r for r in _rules() if r.get("alert") == "TTAPredictionEntropyRising")
    _, records = _identifiers(alert["expr"])
    assert {"tta:prediction_entropy_nats:mean15m", "tta:prediction_entropy_nats:mean6h"} <= records
    assert alert["for"] == "15m"
    store = next(r for r in _rules() if r.get("alert") == "TTAStateStoreDown")
    assert re.fullmatch(r"\s*tta_state_store_up\s*==\s*0\s*", store["expr"])


# --------------------------------------------------------------------------------------------------
# Grafana dashboard
# --------------------------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    dash = _dashboard()
    out = [
        (f"panel {p['id']} {p.get('title')!r}", t["expr"])
        for p in _panels(dash["panels"])
        for t in p.get("targets", [])
        if "expr" in t
    ]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    return out


def test_dashboard_uses_only_existing_metrics_and_recording_rules() -> None:
    queryable, names, recorded = _queryable_names(), Metrics().names(), _recorded()
    exprs = _dashboard_exprs()
    assert exprs
    for where, expr in exprs:
        metrics, records = _identifiers(expr)
        assert metrics <= names, f"{where}: unknown metrics {sorted(metrics - names)}"
        if not expr.startswith("label_values("):
            assert metrics <= queryable, f"{where}: not queryable as written {sorted(metrics - queryable)}"
        assert records <= recorded, f"{where}: undefined recording rules {sorted(records - recorded)}"


def test_dashboard_is_valid_with_unique_ids_and_targets() -> None:
    dash = _dashboard()
    assert dash["uid"] == "tta-drift"
    assert dash["title"]
    assert 36 <= dash["schemaVersion"] <= 41
    panels = list(_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        assert {"id", "type", "title", "gridPos"} <= p.keys(), p.get("title")
        if p["type"] == "row":
            continue
        targets = p.get("targets", [])
        assert targets, f"panel {p['id']} {p['title']!r} has no target"
        for t in targets:
            assert t.get("expr", "").strip() and t.get("refId"), f"panel {p['id']}: empty target"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"panel {p['id']}: duplicate refIds"


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], int] = {}
    for p in _panels(_dashboard()["panels"]):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"panel {p['id']} wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]


def test_dashboard_variables_and_required_panels() -> None:
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name in ("model", "strategy"):
        var = variables[name]
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert query.startswith("label_values("), query
        assert re.search(rf",\s*{name}\)$", query), query
    exprs = " ".join(expr for _, expr in _dashboard_exprs())
    for needed in (
        "tta_requests_total", "tta_request_errors_total", "tta_request_duration_seconds_bucket",
        "tta_adaptation_step_duration_seconds_bucket", "tta_prediction_entropy_nats_sum",
        "tta_prediction_confidence_ratio_sum", "tta_bn_distance_sum", "tta_class_shift_ratio_sum",
        "tta_samples_filtered_total", "tta_state_updates_total", "tta_state_conflicts_total",
        "tta_state_bytes_bucket", "tta_state_store_duration_seconds_bucket", "tta_state_store_up",
    ):  # fmt: skip
        assert needed in exprs, f"no panel shows {needed}"
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = [v.split(":") for v in compose["services"]["grafana"]["volumes"]]
    assert any(src == "../grafana/dashboards" and dst == path for src, dst, *_ in mounts)


# --------------------------------------------------------------------------------------------------
# metrics.md
# --------------------------------------------------------------------------------------------------


def test_metrics_md_documents_every_metric() -> None:
    text = METRICS_MD.read_text()
    table = {m.group(1) for m in re.finditer(r"^\|\s*`(tta_[A-Za-z0-9_]+)`\s*\|", text, flags=re.MULTILINE)}
    documented = _documented_names()
    missing = set(documented) - table
    assert not missing, f"deploy/metrics.md lacks {sorted(missing)}"
    stale = table - set(documented)
    assert not stale, f"deploy/metrics.md documents metrics that do not exist: {sorted(stale)}"
    for row in re.finditer(r"^\|\s*`(tta_[A-Za-z0-9_]+)`\s*\|\s*(\w+)\s*\|", text, flags=re.MULTILINE):
        assert row.group(2) == documented[row.group(1)], f"{row.group(1)} documented as {row.group(2)}"


def test_metrics_md_mentions_only_real_names() -> None:
    text = re.sub(r"\S*/\S*", " ", METRICS_MD.read_text())  # drop paths such as tta_server/metrics.py
    valid = Metrics().names() | set(_documented_names())
    unknown = {n for n in METRIC_RE.findall(text) if n not in valid}
    assert not unknown, f"deploy/metrics.md mentions unknown metrics {sorted(unknown)}"
    undefined = {n for n in RECORD_RE.findall(text) if n not in _recorded()}
    assert not undefined, f"deploy/metrics.md mentions undefined recording rules {sorted(undefined)}"
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert alerts <= set(re.findall(r"\bTTA[A-Za-z0-9]+\b", text)), "alerts missing from deploy/metrics.md"


# --------------------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_have_healthchecks() -> None:
    services = _compose()["services"]
    assert {*SERVER_SERVICES, "redis", "prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    assert services["redis"]["image"] == "redis:7-alpine"
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    # Stream states survive a Redis restart (AOF) and a full Redis refuses writes rather than evicting.
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "/-/healthy" in " ".join(services["prometheus"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(services["grafana"]["healthcheck"]["test"])


def test_compose_servers_wait_for_redis_and_mount_models_read_only() -> None:
    services = _compose()["services"]
    for name in SERVER_SERVICES:
        service = services[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        env = service["environment"]
        assert env["TTA_REDIS_URL"].startswith("redis://redis:6379"), name
        volumes = service["volumes"]
        for target, var in (("/models", "TTA_MODELS_DIR"), ("/data", "TTA_DATA_DIR")):
            mount = next(v for v in volumes if v.split(":")[-2] == target)
            assert mount.startswith(f"${{{var}:-") and mount.endswith(":ro"), mount
        # The default host folders hold every file the mounted models.yaml names.
        host = {v.split(":")[-2]: v.split(":-")[1].split("}")[0] for v in volumes if v.startswith("${")}
        for model in yaml.safe_load(MODELS_CONFIG.read_text())["models"]:
            for path in (model["weights"], model["source_data"]):
                top, rest = "/" + path.split("/")[1], path.split("/", 2)[2]
                assert (COMPOSE.parent / host[top] / rest).is_file(), (name, path)
        # gRPC beside HTTP, published per replica.
        assert env["TTA_GRPC_PORT"] == "8001", name
        assert any(str(p).endswith(":8001") for p in service["ports"]), name


def test_compose_proxy_hashes_streams_over_every_server() -> None:
    services = _compose()["services"]
    proxy = services["tta-proxy"]
    assert proxy["image"].startswith("nginx:") and "./nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert set(proxy["depends_on"]) == set(SERVER_SERVICES)
    conf = (COMPOSE.parent / "nginx.conf").read_text()
    lines = [line.split("#")[0].strip() for line in conf.splitlines()]
    assert "hash $tta_stream consistent;" in lines
    assert "map $uri $tta_stream {" in lines
    pattern = next(line for line in lines if line.startswith("~^/v1/streams/"))
    regex = re.compile(pattern.split()[0][1:].replace("?<stream>", "?P<stream>"))
    for path, stream in (("/v1/streams/cam-7/predict", "cam-7"), ("/v1/streams/cam-7", "cam-7")):
        m = regex.match(path)
        assert m is not None and m.group("stream") == stream
    assert regex.match("/v1/models") is None
    servers = {line.split()[1] for line in lines if line.startswith("server ") and ":" in line.split()[1]}
    assert servers == {f"{name}:8000" for name in SERVER_SERVICES}
    assert "proxy_next_upstream error timeout;" in lines  # a replica that is down: the next on the ring


def test_compose_bind_mounts_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"


def test_prometheus_scrapes_both_servers() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tta-server")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:8000" for name in SERVER_SERVICES}
    assert config["rule_files"]


def test_compose_config_with_docker_compose() -> None:
    env = {**os.environ, "TTA_MODELS_DIR": str(REPO), "TTA_DATA_DIR": str(REPO)}
    docker = shutil.which("docker")
    if docker and _succeeds([docker, "compose", "version"]):
        cmd = [docker, "compose"]
    elif shutil.which("docker-compose"):
        cmd = [str(shutil.which("docker-compose"))]
    else:
        _skip_or_fail("neither `docker compose` nor `docker-compose` is installed")
    proc = _run([*cmd, "-f", str(COMPOSE), "config"], env=env)
    config = yaml.safe_load(proc.stdout)
    assert set(SERVER_SERVICES) <= config["services"].keys()


# --------------------------------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        _skip_or_fail("promtool is not installed (Debian: apt-get install prometheus)")
    return str(path)


def test_promtool_check_rules(promtool: str) -> None:
    _run([promtool, "check", "rules", str(RULES)])


def test_promtool_check_config(promtool: str) -> None:
    _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])


def test_promtool_rule_unit_tests(promtool: str) -> None:
    _run([promtool, "test", "rules", str(RULES_TESTS)])


def test_promtool_parses_dashboard_queries(promtool: str, tmp_path: Path) -> None:
    """Each dashboard expression, with Grafana variables filled in, as a recording rule for promtool."""
    rules = []
    for i, (_, expr) in enumerate(_dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        filled = expr.replace("$__rate_interval", "5m").replace("$model", ".*").replace("$strategy", ".*")
        rules.append({"record": f"dashboard:expr:{i}", "expr": filled})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run([promtool, "check", "rules", str(path)])


# --------------------------------------------------------------------------------------------------
# Helm chart
# --------------------------------------------------------------------------------------------------

ALL_ON = {
    "autoscaling": {"enabled": True},
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "apiKeys": {"existingSecret": "tta-api-keys"},
    "redis": {"bundled": {"enabled": True}},
    "ingress": {"enabled": True, "host": "tta.example.org"},
    "server": {"grpcPort": 8001},
}


def _render_with_helm(helm: str, values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values))
    proc = _run([helm, "template", "tta", str(CHART), "--namespace", "ml", "-f", str(values_file)])
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def render() -> Any:
    """render(values, tmp_path) -> manifests, through the helm CLI or helm-python-sdk."""
    helm = shutil.which("helm")
    if helm:
        all_on = "autoscaling.enabled=true,serviceMonitor.enabled=true,prometheusRule.enabled=true"
        for extra in ([], ["--set", all_on]):
            _run([helm, "lint", "--strict", str(CHART), *extra])
        return lambda values, tmp_path: _render_with_helm(str(helm), values, tmp_path)
    try:
        import helm_python
    except ImportError:
        _skip_or_fail("neither helm nor helm-python-sdk is installed (pip install helm-python-sdk)")

    for values in ({}, ALL_ON):
        report = helm_python.lint(str(CHART), values, strict=True)
        errors = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
        assert not errors, f"helm lint: {errors}"

    def _render(values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
        chart = helm_python.Chart.load(str(CHART))
        rendered = chart.render(values, name="tta", namespace="ml", is_install=True)
        docs = [
            d
            for path, text in sorted(rendered.items())
            if path.endswith((".yaml", ".yml"))
            for d in yaml.safe_load_all(text)
        ]
        return [d for d in docs if d]

    return _render


def _kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_helm_default_render(render: Any, tmp_path: Path) -> None:
    docs = render({}, tmp_path)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    assert not kinds & {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "Secret", "Ingress"}
    deployment = _kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TTA_REDIS_URL"]["value"].startswith("redis://")
    assert env["TTA_MODELS_CONFIG"]["value"] == "/etc/tta/models.yaml"
    assert "TTA_API_KEYS" not in env
    assert "TTA_GRPC_PORT" not in env and [p["name"] for p in container["ports"]] == ["http"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and mounts["/data"]["readOnly"]
    configmap = _kind(docs, "ConfigMap")
    assert yaml.safe_load(configmap["data"]["models.yaml"]) == yaml.safe_load(MODELS_CONFIG.read_text())


def test_helm_render_with_everything_enabled(render: Any, tmp_path: Path) -> None:
    docs = render(ALL_ON, tmp_path)
    hpa = _kind(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # ...and the service's own load signal, a gauge the server exports.
    pods = hpa["spec"]["metrics"][1]["pods"]
    assert pods["metric"]["name"] == "tta_pending_requests" in _families()
    assert _families()["tta_pending_requests"] == "gauge" and float(pods["target"]["averageValue"]) > 0
    ingress = _kind(docs, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$tta_stream"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": _kind(docs, "Deployment")["metadata"]["name"], "port": {"name": "http"}}
    assert "replicas" not in _kind(docs, "Deployment")["spec"]
    assert _kind(docs, "ServiceMonitor")["apiVersion"] == "monitoring.coreos.com/v1"
    rule = _kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    (container,) = _kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TTA_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "tta-api-keys"
    # The bundled Redis persists (AOF) and never evicts a stream; the servers point at it.
    redis_set = _kind(docs, "StatefulSet")
    args = redis_set["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert env["TTA_REDIS_URL"]["value"] == "redis://tta-tta-server-redis:6379/0"
    # gRPC (Open Inference Protocol) on its own named port, in the container and the Service.
    assert env["TTA_GRPC_PORT"]["value"] == "8001"
    assert {"name": "grpc", "containerPort": 8001, "protocol": "TCP"} in container["ports"]
    name = _kind(docs, "Deployment")["metadata"]["name"]
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == name]
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["grpc"]["targetPort"] == "grpc" and service_ports["grpc"]["port"] == 8001


def test_chart_copies_stay_in_sync() -> None:
    assert (CHART / "files" / "tta.rules.yml").read_text() == RULES.read_text(), (
        "deploy/helm/tta-server/files/tta.rules.yml differs from deploy/prometheus/rules/tta.rules.yml"
    )
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert yaml.safe_load(values["models"]["config"]) == yaml.safe_load(MODELS_CONFIG.read_text())
    templates = {p.name for p in (CHART / "templates").iterdir()}
    assert {
        "_helpers.tpl", "deployment.yaml", "configmap.yaml", "service.yaml", "hpa.yaml",
        "servicemonitor.yaml", "prometheusrule.yaml", "NOTES.txt",
    } <= templates  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Models config
# --------------------------------------------------------------------------------------------------


def test_shipped_models_config_is_valid() -> None:
    from adapters.models.loading import ModelSpec

    config = yaml.safe_load(MODELS_CONFIG.read_text())
    specs = [ModelSpec.model_validate(entry) for entry in config["models"]]
    assert config["default_model"] in {s.id for s in specs}
    (spec,) = specs
    assert spec.id == "cifar10_wrn40_2" and spec.depth == 40 and spec.widen_factor == 2
    assert str(spec.weights).startswith("/models/") and str(spec.source_data).startswith("/data/")


# --------------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined, comments and heredoc bodies dropped."""
    out: list[tuple[str, str]] = []
    lines = iter(DOCKERFILE.read_text().splitlines())
    buffer = ""
    for line in lines:
        if not buffer and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buffer and line.lstrip().startswith("#"):
            continue
        buffer += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        heredoc = re.search(r"<<-?'?\"?(\w+)'?\"?", buffer)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
        keyword, _, args = buffer.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buffer = ""
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def test_dockerfile_is_multistage_with_selectable_torch() -> None:
    instructions = _dockerfile_instructions()
    froms = [args for k, args in instructions if k == "FROM"]
    assert len(froms) >= 3, froms
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert any("runtime-${TORCH_VARIANT}" in f for f in froms)
    assert any(k == "COPY" and "--from=builder" in a and "/opt/venv" in a for k, a in _final_stage())


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    final = _final_stage()
    users = [args for k, args in final if k == "USER"]
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, users[-1]
    healthchecks = [args for k, args in final if k == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]
    assert "python" in healthchecks[0] and "curl" not in healthchecks[0]
    assert ("EXPOSE", "8000") in final
    entrypoint = json.loads(next(a for k, a in final if k == "ENTRYPOINT"))
    assert entrypoint == ["python", "-m", "tta_server"]


def test_dockerfile_parses_with_the_buildkit_parser() -> None:
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile for the BuildKit parser")
    commands = dockerfile.parse_file(str(DOCKERFILE))
    ours = [k for k, _ in _dockerfile_instructions()]
    assert [c.cmd.upper() for c in commands] == ours


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()}
    assert {".git", ".venv", ".pytest_cache", "**/__pycache__"} <= patterns
    assert "deploy/models.cifar10.yaml" not in patterns
    for kept in ("tta_server", "adapters", "pyproject.toml", "README.md"):
        assert kept not in patterns
    assert {"bench", "clients", "tests"} <= patterns  # other distributions, not the server's


def test_dockerfile_builds_the_server_from_its_own_sources_only() -> None:
    """The image's wheel is the root distribution: the server and the core, no benches, no client SDK."""
    copied = [a for k, a in _dockerfile_instructions() if k == "COPY" and not a.startswith("--from")]
    sources = {src for args in copied for src in args.split()[:-1]}
    assert sources == {"pyproject.toml", "README.md", "adapters", "tta_server", "deploy/models.cifar10.yaml"}
