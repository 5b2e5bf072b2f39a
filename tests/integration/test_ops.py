"""The ops/ material agrees with the service: Prometheus config, rules and alert unit tests pass
promtool; every metric the dashboard and the rules read is one processor/metrics.py exports; the
Kubernetes and systemd files use the ports, flags and shutdown bounds the service has.

No database and no server: these read files (and run promtool when it is installed).
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from processor import config

pytestmark = pytest.mark.timeout(60)

ROOT = pathlib.Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
PROMETHEUS = OPS / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yml"
RULE_FILES = (PROMETHEUS / "rules.yml", PROMETHEUS / "alerts.yml")
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
DASHBOARD = OPS / "grafana" / "points-dashboard.json"
KUBERNETES = OPS / "kubernetes" / "points-processor.yaml"
SYSTEMD_UNIT = OPS / "systemd" / "points-processor.service"
SYSTEMD_ENV = OPS / "systemd" / "processor.env.example"
RUNBOOK = OPS / "RUNBOOK.md"
METRICS_SOURCE = ROOT / "processor" / "metrics.py"

PROMTOOL_SECONDS_MAX = 45
# Series Prometheus itself adds to every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Labels the scrape adds (prometheus.yml, the Kubernetes example, the ServiceMonitor).
TARGET_LABELS = {"job", "instance", "environment", "namespace", "pod", "service", "endpoint", "container"}
SEVERITIES = {"critical", "warning"}


# ---------------------------------------------------------------------------------------------------
# promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool is not on PATH (it ships with Prometheus; Debian: apt-get install prometheus): "
            "the Prometheus config, rules and alert unit tests were not checked"
        )
    return path


def _promtool(promtool: str, *arguments: str, cwd: pathlib.Path = PROMETHEUS) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *arguments], cwd=cwd, capture_output=True, text=True, timeout=PROMTOOL_SECONDS_MAX)


def _assert_succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )


def test_prometheus_config_is_valid(promtool):
    result = _promtool(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    _assert_succeeded(result)
    # the config loads the rule files, so promtool checked them too
    for rule_file in RULE_FILES:
        assert rule_file.name in result.stdout


def test_rule_files_are_valid(promtool):
    _assert_succeeded(_promtool(promtool, "check", "rules", *map(str, RULE_FILES)))


def test_alert_unit_tests_pass(promtool):
    _assert_succeeded(_promtool(promtool, "test", "rules", str(ALERTS_TEST)))


def test_commented_kubernetes_scrape_job_is_valid(promtool, tmp_path):
    """The kubernetes_sd job in prometheus.yml is commented out; uncommented it must still be valid."""
    text = PROMETHEUS_CONFIG.read_text()
    start = text.index("  # - job_name: points-processor-kubernetes")
    uncommented = text[:start] + "".join(
        line[:2] + line[4:] if line.startswith("  # ") else line for line in text[start:].splitlines(keepends=True)
    )
    for rule_file in RULE_FILES:
        shutil.copy(rule_file, tmp_path / rule_file.name)
    candidate = tmp_path / "prometheus.yml"
    candidate.write_text(uncommented)
    job = load_yaml(uncommented)[0]["scrape_configs"][1]
    assert job["job_name"] == "points-processor-kubernetes"
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    kept = {(tuple(r["source_labels"]), r["regex"]) for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert (("__meta_kubernetes_pod_container_port_name",), "metrics") in kept
    assert (("__meta_kubernetes_pod_label_app_kubernetes_io_name",), "points-processor") in kept
    result = _promtool(promtool, "check", "config", str(candidate), cwd=tmp_path)
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian's promtool is built without Kubernetes discovery: the rest of the file is still checked
        # by it, and the Kubernetes job's structure above; only promtool's view of that job is missing
        config = load_yaml(uncommented)[0]
        config["scrape_configs"] = [c for c in config["scrape_configs"] if "kubernetes_sd_configs" not in c]
        candidate.write_text(yaml.safe_dump(config))
        _assert_succeeded(_promtool(promtool, "check", "config", str(candidate), cwd=tmp_path))
        pytest.skip(
            "this promtool is built without Kubernetes service discovery: the Kubernetes scrape job "
            "was checked for its structure only, the rest of prometheus.yml by promtool"
        )
    _assert_succeeded(result)


# ---------------------------------------------------------------------------------------------------
# The rules: every alert is tested, has a severity, annotations and a runbook section


def _rules(path: pathlib.Path) -> list[dict]:
    (document,) = load_yaml(path.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _alerts() -> list[dict]:
    return [rule for path in RULE_FILES for rule in _rules(path) if "alert" in rule]


def _recorded_names() -> set[str]:
    return {rule["record"] for path in RULE_FILES for rule in _rules(path) if "record" in rule}


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_severity_annotations_and_a_runbook_section():
    anchors = {github_anchor(line.lstrip("#")) for line in RUNBOOK.read_text().splitlines() if line.startswith("#")}
    alerts = _alerts()
    assert len(alerts) >= 10
    names = [alert["alert"] for alert in alerts]
    assert len(names) == len(set(names)), "alert names must be unique"
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"PointsProcessor[A-Z][A-Za-z0-9]+", name), name
        assert alert.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        annotations = alert.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key), f"{name}: annotation {key} missing"
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path.endswith("ops/RUNBOOK.md"), f"{name}: runbook_url {annotations['runbook_url']}"
        assert anchor == name.lower(), f"{name}: runbook anchor should be #{name.lower()}"
        assert anchor in anchors, f"{name}: ops/RUNBOOK.md has no section '### {name}'"


def test_every_alert_has_a_unit_test_and_a_case_where_it_must_not_fire():
    text = ALERTS_TEST.read_text()
    (document,) = load_yaml(text)
    cases = [case for test in document["tests"] for case in test.get("alert_rule_test", [])]
    tested = {case["alertname"] for case in cases if case.get("exp_alerts")}
    missing = sorted({alert["alert"] for alert in _alerts()} - tested)
    assert not missing, f"alerts_test.yml never makes these alerts fire: {missing}"
    assert any(case.get("exp_alerts") == [] for case in cases), "no case where an alert must not fire"


# ---------------------------------------------------------------------------------------------------
# Metric names: what the dashboard and the rules read must be what processor/metrics.py exports

_METRIC_CONSTRUCTORS = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}


def declared_metrics(source: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, label names) for every metric constructed in the source of metrics.py."""
    declared = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        kind = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        if kind not in _METRIC_CONSTRUCTORS or not node.args:
            continue
        if not (isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            continue
        labels_node = (
            node.args[2]
            if len(node.args) > 2
            else next((k.value for k in node.keywords if k.arg == "labelnames"), None)
        )
        labels = ()
        if isinstance(labels_node, (ast.List, ast.Tuple)):
            labels = tuple(e.value for e in labels_node.elts if isinstance(e, ast.Constant))
        declared[node.args[0].value] = (kind, labels)
    return declared


def exported_series(source: str) -> dict[str, set[str]]:
    """Series name -> label names it carries, as prometheus_client exports the metrics of the source:
    counters as NAME_total (their names already end in _total), histograms as _bucket/_sum/_count."""
    series: dict[str, set[str]] = {}
    for name, (kind, labels) in declared_metrics(source).items():
        labels = set(labels)
        if kind == "Counter":
            base = name[: -len("_total")] if name.endswith("_total") else name
            series[base + "_total"] = labels
        elif kind == "Histogram":
            series[name + "_bucket"] = labels | {"le"}
            series[name + "_sum"] = labels
            series[name + "_count"] = labels
        elif kind == "Summary":
            series[name] = labels | {"quantile"}
            series[name + "_sum"] = labels
            series[name + "_count"] = labels
        elif kind == "Info":
            series[name + "_info"] = labels
        else:
            series[name] = labels
    return series


def standard_collector_series() -> dict[str, set[str]]:
    """process_*, python_* series: exported because metrics.py serves the default registry."""
    import prometheus_client
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    from processor import metrics

    if metrics.registry is not prometheus_client.REGISTRY:
        return {}
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_SELECTOR = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def _without_variables(expression: str) -> str:
    """Grafana's $variables and ${variables} replaced by a neutral token."""
    return re.sub(r"\$\{[^}]*\}|\$\w+", "1", expression)


def metric_references(expression: str) -> dict[str, set[str]]:
    """Metric names a PromQL expression reads -> label names its selectors match on."""
    expression = _STRING.sub('""', _without_variables(expression))
    references: dict[str, set[str]] = {}
    for name, matchers in _SELECTOR.findall(expression):
        labels = set(_MATCHER_LABEL.findall(matchers))
        references.setdefault(name, set()).update(labels - {"__name__"})
    stripped = re.sub(r"\{[^{}]*\}", " ", expression)  # label matchers
    stripped = re.sub(r"\[[^\[\]]*\]", " ", stripped)  # ranges and subqueries
    stripped = _GROUPING.sub(" ", stripped)
    for name, call in _IDENTIFIER.findall(stripped):
        if call or name.lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        references.setdefault(name, set())
    return references


def grafana_query_expression(query: str) -> str:
    """The PromQL inside a Grafana Prometheus variable query (label_values, query_result)."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]\w*\s*\)\s*", query, re.S)
    if match:
        return match.group(1)
    match = re.fullmatch(r"\s*label_values\(\s*[a-zA-Z_]\w*\s*\)\s*", query)
    if match:
        return ""
    match = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    return match.group(1) if match else query


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a dashboard."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            title = node.get("title", where)
            if isinstance(node.get("expr"), str):
                found.append((f"panel {title!r}", node["expr"]))
            for key, value in node.items():
                if key != "templating":
                    walk(value, title)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(dashboard.get("panels", []), "dashboard")
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            query = query.get("query", "") if isinstance(query, dict) else query or ""
            found.append((f"variable ${variable['name']}", grafana_query_expression(query)))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    found = []
    for path in RULE_FILES:
        for rule in _rules(path):
            found.append((f"{path.name} {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return found


def alert_test_series() -> list[tuple[str, str]]:
    (document,) = load_yaml(ALERTS_TEST.read_text())
    return [
        (f"alerts_test.yml series {series['series']}", series["series"])
        for test in document["tests"]
        for series in test.get("input_series", [])
    ]


def unknown_references(
    expressions: list[tuple[str, str]], exported: dict[str, set[str]], recorded: set[str]
) -> list[str]:
    problems = []
    for where, expression in expressions:
        for name, labels in sorted(metric_references(expression).items()):
            if ":" in name:
                if name not in recorded:
                    problems.append(f"{where}: recording rule {name} is not defined in rules.yml")
            elif name in PROMETHEUS_SERIES:
                continue
            elif name not in exported:
                problems.append(f"{where}: {name} is not exported by processor/metrics.py")
            else:
                unknown = labels - exported[name] - TARGET_LABELS
                if unknown:
                    problems.append(f"{where}: {name} has no label {sorted(unknown)}")
    return problems


def _all_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return dashboard_expressions(dashboard) + rule_expressions() + alert_test_series()


def test_metric_references_parse_names_and_labels():
    expression = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_seconds_bucket{job=~"$job", '
        'code!="OK"}[5m]))) / on (job) group_left b_total offset 10m > 1e3 and bool '
        'c:rule:rate5m unless d{reason="x{y}"} * ${factor}'
    )
    assert metric_references(expression) == {
        "a_seconds_bucket": {"job", "code"},
        "b_total": set(),
        "c:rule:rate5m": set(),
        "d": {"reason"},
    }
    assert grafana_query_expression('label_values(x{job=~"$job"}, instance)') == 'x{job=~"$job"}'


def test_dashboard_and_rules_read_only_exported_metrics():
    exported = exported_series(METRICS_SOURCE.read_text()) | standard_collector_series()
    expressions = _all_expressions()
    assert len(expressions) > 40
    problems = unknown_references(expressions, exported, _recorded_names())
    assert not problems, "\n".join(problems)


def test_renaming_a_metric_breaks_the_reference_check():
    """The check above sees a rename: metrics.py with one metric and one label renamed fails it."""
    source = METRICS_SOURCE.read_text()
    for old, new in (
        ('"points_pipeline_commit_seconds"', '"points_pipeline_commit_duration_seconds"'),
        ('["result"]', '["outcome"]'),
    ):
        assert old in source, f"metrics.py no longer has {old}: update this test"
        source = source.replace(old, new)
    exported = exported_series(source) | standard_collector_series()
    problems = "\n".join(unknown_references(_all_expressions(), exported, _recorded_names()))
    assert "points_pipeline_commit_seconds_bucket is not exported" in problems
    assert "points_pipeline_batches_total has no label ['result']" in problems


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    # what the dashboard is for: RED per method, pipeline, fast path, business
    read = set()
    for _, expression in dashboard_expressions(dashboard):
        read |= set(metric_references(expression))
    for name in (
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "points_pipeline_batch_operations_bucket",
        "points_pipeline_commit_seconds_bucket",
        "points_pipeline_queue_operations",
        "points_pipeline_queue_operations_max",
        "points_pipeline_batches_total",
        "points_idempotent_replays_total",
        "points_pipeline_operations_shed_total",
        "points_fastpath_members",
        "points_fastpath_holds_open",
        "points_fastpath_rejections_total",
        "points_earned_point_units_total",
        "points_redeemed_point_units_total",
        "points_refunded_point_units_total",
    ):
        assert name in read, f"the dashboard has no panel on {name}"


# ---------------------------------------------------------------------------------------------------
# Deployment files: ports, flags and shutdown bounds match the service


def _option(name: str) -> config.Option:
    return next(option for option in config.OPTIONS if option.name == name)


def _flags(arguments: list[str]) -> dict[str, str]:
    """--name value / --name=value pairs of a command line."""
    flags, index = {}, 0
    while index < len(arguments):
        argument = str(arguments[index])
        if argument.startswith("--"):
            name, equals, value = argument.partition("=")
            if not equals and index + 1 < len(arguments) and not str(arguments[index + 1]).startswith("--"):
                value = str(arguments[index + 1])
                index += 1
            flags[name] = value
        index += 1
    return flags


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _stop_seconds_max(values: dict[str, str]) -> float:
    """The longest a SIGTERM'd service may take to exit under these variables (defaults otherwise):
    every shutdown_*_seconds phase (drain, grace) plus the commit of the last batch."""
    phases = [
        o
        for o in config.OPTIONS
        if (o.name.startswith("shutdown_") and o.name.endswith("_seconds")) or o.name == "commit_timeout_seconds"
    ]
    assert any(o.name == "shutdown_grace_seconds" for o in phases)
    return sum(float(values.get(o.env_name, o.default)) for o in phases)


def test_kubernetes_manifest_matches_the_service_flags():
    documents = [d for d in load_yaml(KUBERNETES.read_text()) if d]
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) >= {"Deployment", "Service", "ServiceMonitor"}
    deployment, service, monitor = by_kind["Deployment"], by_kind["Service"], by_kind["ServiceMonitor"]

    # a single writer per database: one replica, never two at once
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert "advisory lock" in KUBERNETES.read_text()

    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    command = [str(part) for part in container.get("command", []) + container.get("args", [])]
    assert "processor" in command and "serve" in command
    serve_flags = _flags(command[command.index("serve") + 1 :])
    known = {option.flag for option in config.OPTIONS}
    assert set(serve_flags) <= known, f"unknown serve flags {set(serve_flags) - known}"
    listen, metrics_listen = serve_flags[_option("listen").flag], serve_flags[_option("metrics_listen").flag]
    assert listen.startswith("0.0.0.0:") and metrics_listen.startswith("0.0.0.0:")
    grpc_port, metrics_port = _port(listen), _port(metrics_listen)

    # shipped with TLS on: the certificate and key come from a mounted Secret
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
    for flag in (_option("tls_cert_file").flag, _option("tls_key_file").flag):
        path = serve_flags[flag]
        assert any(path.startswith(mounts[name] + "/") for name in secrets if name in mounts), (flag, path)
    assert _option("insecure").flag not in serve_flags
    # a Secret volume's files belong to root and the pod's fsGroup: the service's group must read them
    assert pod["spec"]["securityContext"]["fsGroup"] == pod["spec"]["securityContext"]["runAsGroup"]

    # the kubelet's gRPC probes cannot speak TLS: they use the plaintext health-only listener
    health_port = _port(serve_flags[_option("health_listen").flag])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port, "health": health_port}
    assert "livenessProbe" in container and "readinessProbe" in container
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in container:  # the standard health service, on the health-only port
            assert container[probe]["grpc"]["port"] == health_port, probe

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port

    environment = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in environment[_option("database_url").env_name]["valueFrom"]
    assert "value" not in environment[_option("database_url").env_name]
    for entry in environment.values():
        assert entry["name"] in {o.env_name for o in config.OPTIONS}, f"unknown variable {entry['name']}"

    # SIGKILL must not come before the drain, the grace and the last batch's commit are over
    values = {name: entry["value"] for name, entry in environment.items() if "value" in entry}
    assert pod["spec"]["terminationGracePeriodSeconds"] > _stop_seconds_max(values)
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]

    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["grpc"]["port"] == grpc_port and service_ports["grpc"]["targetPort"] in ("grpc", grpc_port)
    assert service_ports["metrics"]["port"] == metrics_port
    assert service_ports["metrics"]["targetPort"] in ("metrics", metrics_port)
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # the job label is the Service's name: the one the alerts select on
    assert service["metadata"]["name"] == "points-processor"
    assert 'job="points-processor"' in (PROMETHEUS / "alerts.yml").read_text()


def _systemd_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _env_file(text: str) -> tuple[dict[str, str], set[str]]:
    """(set variables, all variables named, commented out or not) of an EnvironmentFile."""
    values, named = {}, set()
    for line in text.splitlines():
        match = re.match(r"\s*(#)?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            named.add(match.group(2))
            if not match.group(1):
                values[match.group(2)] = match.group(3).strip()
    return values, named


def test_systemd_env_example_lists_every_option_and_nothing_else():
    _, named = _env_file(SYSTEMD_ENV.read_text())
    options = {option.env_name for option in config.OPTIONS}
    assert named == options, f"missing {sorted(options - named)}, unknown {sorted(named - options)}"


def test_systemd_unit_is_hardened_and_outlasts_the_drain():
    unit = _systemd_unit(SYSTEMD_UNIT.read_text())
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["User"] not in ("", "root")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["EnvironmentFile"] == "/etc/points/processor.env"
    executable, *arguments = service["ExecStart"].split()
    assert executable.startswith("/") and executable.endswith("/.venv/bin/python")
    assert arguments[:2] == ["-m", "processor"] and "serve" in arguments
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service.get(key) == value, f"{key}={value} expected"

    values, _ = _env_file(SYSTEMD_ENV.read_text())
    assert float(service["TimeoutStopSec"]) > _stop_seconds_max(values)
    assert "DATABASE_URL" in values

    # shipped with TLS on, to clients and to Postgres; `systemctl reload` rereads the certificates
    assert values[_option("tls_cert_file").env_name] and values[_option("tls_key_file").env_name]
    assert values.get(_option("insecure").env_name, "0") == "0"
    assert "sslmode=verify-full" in values["DATABASE_URL"] and "sslrootcert=" in values["DATABASE_URL"]
    assert "-HUP" in service["ExecReload"]
    assert values[_option("metrics_listen").env_name].startswith("127.0.0.1:")


def load_yaml(text: str) -> list:
    return list(yaml.safe_load_all(text))
