"""The files in deploy/, each checked by the real tool for its kind (hadolint, Docker Compose,
promtool, kubernetes-validate, systemd-analyze), and checked against the project itself: every
metric they name is exported, the manifests agree with each other and with the tree they run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from otp_agents.ops.metrics import Metrics
from otp_agents.spec.load import loads
from otp_agents.spec.model import stop_bound

from .helpers import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A validator installed by `make setup` (the deploy extra) or by .ci/run (Debian packages)."""
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    assert found, f"{name} is not installed: run `make setup` (and see .ci/run for Debian packages)"
    return found


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def exported() -> set[str]:
    """Every series name the supervisor's /metrics can carry."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    for fam in Metrics().registry.collect():
        names.add(fam.name)
        names.update(fam.name + s for s in suffixes.get(fam.type, ()))
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names an expression refers to (the project's and process_*)."""
    return set(re.findall(r"\b((?:otp_agents|process)_[a-z_]+)\b", expr))


def k8s(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


# -- container and compose ----------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    out = run(tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_runs_the_supervisor_as_pid_1_non_root_with_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["otp-agents", "run"]' in text and "tini" not in text and "dumb-init" not in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'CMD ["supervisors/default.toml"]' in text
    assert "--require-hashes" in text and "requirements-${EXTRAS}.lock" in text  # the wheels the tests ran on


def test_compose_file_is_valid() -> None:
    out = run(tool("docker-compose"), "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet")
    assert out.returncode == 0, out.stderr


def test_compose_gives_the_tree_its_stop_time_and_every_variable_is_documented() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    agents = compose["services"]["otp-agents"]
    tree = ROOT / agents["command"][0]
    bound = stop_bound(loads(tree.read_text(), str(tree)))
    assert bound is not None and float(agents["stop_grace_period"].rstrip("s")) >= bound + 5
    documented = set(re.findall(r"^([A-Z_]+)=", (DEPLOY / "env.example").read_text(), re.M))
    read_by_project = {"LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"} | set(
        name
        for part in (ROOT / "otp_agents" / "cli").glob("*.py")
        for name in re.findall(r'envvar="(OTP_AGENTS_[A-Z_]+)"', part.read_text())
    )
    assert read_by_project <= documented, read_by_project - documented


# -- Prometheus and Grafana ---------------------------------------------------------------------


def test_alerting_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = tool("promtool")
    check = run(promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert check.returncode == 0, check.stdout + check.stderr
    tests = run(promtool, "test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")
    assert tests.returncode == 0 and "SUCCESS" in tests.stdout, tests.stdout + tests.stderr


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]  # the path inside the container
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = run(tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_metric_in_the_alerts_and_the_dashboard_is_exported() -> None:
    names = exported()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set().union(*(metric_names(e) for e in exprs))
    assert len(used) >= 15
    assert used <= names, used - names


def test_dashboard_is_well_formed_and_its_queries_parse(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    assert dashboard["uid"] == "otp-agents" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 12
    rules = []
    for p in dashboard["panels"]:
        assert p["type"] in ("timeseries", "bargauge", "stat") and p["title"]
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys()
        for t in p["targets"]:
            # Grafana's own variables, as Grafana would substitute them, so promtool can parse it.
            expr = (
                t["expr"]
                .replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$instance", ".*")
            )
            rules.append({"record": f"panel_{p['id']}_{t['refId']}", "expr": expr})
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = run(tool("promtool"), "check", "rules", str(tmp_path / "panels.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    provisioning = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"


# -- Kubernetes -----------------------------------------------------------------------------------


def test_manifests_pass_kubernetes_validate_strict() -> None:
    files = sorted(str(p) for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    out = run(tool("kubernetes-validate"), "--strict", *files)
    assert out.returncode == 0, out.stdout + out.stderr
    # The prometheus-operator resources have no schema here: they are checked below.
    assert "passed for resource deployment/otp-agents" in out.stdout + out.stderr


def test_manifests_agree_with_each_other_and_with_the_tree() -> None:
    (deployment,) = k8s("deployment.yaml")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9464}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTP_AGENTS_METRICS"].endswith(":9464")
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["args"][0] == "/etc/otp-agents/tree.toml" and "--watch-tree" in container["args"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    # The ConfigMap's tree is the shipped LiveKit tree, loads, and stops within the grace period.
    (configmap,) = k8s("configmap.yaml")
    tree_text = configmap["data"]["tree.toml"]
    assert tree_text == (ROOT / "supervisors" / "livekit.toml").read_text()
    bound = stop_bound(loads(tree_text, "configmap.yaml"))
    assert bound is not None and pod["spec"]["terminationGracePeriodSeconds"] >= bound + 5
    mounted = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounted["tree"]["configMap"]["name"] == configmap["metadata"]["name"]
    secret_refs = {e["secretRef"]["name"] for e in container["envFrom"]}
    (secret,) = k8s("secret.example.yaml")
    assert secret["metadata"]["name"] in secret_refs
    assert set(secret["stringData"]) == {"LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"}

    (service,) = k8s("service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    (pdb,) = k8s("pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = k8s("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in exported()
    (adapter,) = k8s("prometheus-adapter-rules.yaml")
    assert "otp_agents_pool_load" in adapter["data"]["config.yaml"]

    # prometheus-operator resources: select the pods, scrape the named port's /metrics.
    (podmonitor,) = k8s("podmonitor.yaml")
    assert podmonitor["apiVersion"] == "monitoring.coreos.com/v1" and podmonitor["kind"] == "PodMonitor"
    assert podmonitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    (servicemonitor,) = k8s("servicemonitor.yaml")
    assert servicemonitor["kind"] == "ServiceMonitor"
    assert servicemonitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert servicemonitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / r).exists() for r in kustomization["resources"])


# -- systemd --------------------------------------------------------------------------------------


def _unit_root(tmp_path: Path) -> Path:
    """A root directory with the unit, systemd's own units and a stand-in for ExecStart (verify
    insists that the program exists)."""
    root = tmp_path / "root"
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    unit = (DEPLOY / "systemd" / "otp-agents.service").read_text()
    program = re.search(r"^ExecStart=(\S+)", unit, re.M)
    assert program is not None
    stub = root / program.group(1).lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    (root / "etc" / "systemd" / "system" / "otp-agents.service").write_text(unit)
    return root


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies_cleanly_and_is_hardened(tmp_path: Path) -> None:
    root = _unit_root(tmp_path)
    out = run("systemd-analyze", "verify", f"--root={root}", "otp-agents.service")
    # verify only warns about unknown keys and sections: any output at all is a failure.
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stderr
    security = run(
        "systemd-analyze", "security", "--offline=true", str(DEPLOY / "systemd" / "otp-agents.service")
    )
    score = re.search(r"Overall exposure level for otp-agents.service: ([0-9.]+)", security.stdout)
    assert score is not None and float(score.group(1)) <= 2.0, security.stdout[-2000:]
    unit = (DEPLOY / "systemd" / "otp-agents.service").read_text()
    assert "Type=notify" in unit and re.search(r"^WatchdogSec=\d+", unit, re.M)
    stop = re.search(r"^TimeoutStopSec=(\d+)s", unit, re.M)
    bound = stop_bound(loads((ROOT / "supervisors" / "livekit.toml").read_text()))
    assert stop is not None and bound is not None and int(stop.group(1)) >= bound + 5


def test_the_app_pool_overlay_and_drop_in_wait_for_its_drain(tmp_path: Path) -> None:
    """An app pool drains for up to an hour (LiveKit's own default): its Kubernetes overlay and
    its systemd drop-in give its tree at least the stop bound `otp-agents check` prints, and the
    overlay's tree is the shipped one."""
    overlay = K8S / "agents-pool"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../"]
    assert all((overlay / patch["path"]).exists() for patch in kustomization["patches"])
    tree_text = (ROOT / "supervisors" / "agents_pool.toml").read_text()
    (configmap,) = [d for d in yaml.safe_load_all((overlay / "configmap-patch.yaml").read_text()) if d]
    assert configmap["data"]["tree.toml"] == tree_text
    assert configmap["metadata"]["name"] == k8s("configmap.yaml")[0]["metadata"]["name"]
    bound = stop_bound(loads(tree_text, "agents_pool.toml"))
    assert bound is not None and bound >= 3600  # the drain is in the bound
    (patch,) = [d for d in yaml.safe_load_all((overlay / "deployment-patch.yaml").read_text()) if d]
    assert patch["metadata"]["name"] == k8s("deployment.yaml")[0]["metadata"]["name"]
    assert patch["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= bound + 5
    drop_in = (DEPLOY / "systemd" / "agents-pool.conf").read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)s", drop_in, re.M)
    assert stop is not None and int(stop.group(1)) >= bound + 5
    if shutil.which("systemd-analyze") is not None:  # the drop-in applies to the unit cleanly
        root = _unit_root(tmp_path)
        d = root / "etc" / "systemd" / "system" / "otp-agents.service.d"
        d.mkdir()
        (d / "agents-pool.conf").write_text(drop_in)
        out = run("systemd-analyze", "verify", f"--root={root}", "otp-agents.service")
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stderr
    assert "ARG EXTRAS=voice" in (DEPLOY / "Dockerfile").read_text()


def test_every_lock_pins_each_package_with_its_hash_and_the_smaller_ones_agree_with_the_whole() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock", DEPLOY / "lock.py")
    assert spec is not None and spec.loader is not None
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    pins = lock.pins
    names = ("requirements.lock", "requirements-voice.lock", "requirements-voice-agents.lock")
    locks = {name: DEPLOY.parent / name for name in names}
    whole = pins(locks["requirements.lock"])
    for name, path in locks.items():
        text = path.read_text()
        entries = [e for e in text.split("\n") if "==" in e]
        hashes = [e for e in text.split("\n") if e.strip().startswith("--hash=sha256:")]
        assert entries and len(entries) == len(hashes), name  # one hash per pinned package
        assert all(len(h.strip().removeprefix("--hash=sha256:")) == 64 for h in hashes), name
        assert pins(path).items() <= whole.items(), name  # the same versions as the whole set
    assert {"livekit", "pocketsphinx", "msgspec", "anyio"} <= set(pins(locks["requirements-voice.lock"]))
    assert "livekit-agents" in pins(locks["requirements-voice-agents.lock"])
    assert "pytest" not in pins(locks["requirements-voice.lock"])  # make run stays lean
