"""Scenario 9 (TLS): a calibration over ``tls://`` with freshly generated certificates, and
clients without a valid certificate refused by the scheduler.

A fresh CA signs a cluster certificate (server and client use, for the scheduler and the
workers) and a client certificate (client use only, for the driver); another CA signs a
rogue client certificate. ``dask scheduler`` and ``dask worker`` run as real processes on
127.0.0.1 with ``--protocol tls``; ``simcal run`` connects with ``--tls-*``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import re
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dask_kubernetes.operator.controller import (
    build_scheduler_deployment_spec,
    build_worker_deployment_spec,
)
from distributed import Client
from distributed.comm import connect
from distributed.security import Security

from chart import expand_k8s_vars, find, local_mounts, mount_rewriter, render
from conftest import run_simcal, write_config
from processes import DASK, HOST, Proc, simcal_run, start, stopping, wait_until

MAX_TRIALS = 8


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cluster: Pair  # scheduler and workers (serverAuth + clientAuth)
    client: Pair  # the driver (clientAuth only)
    rogue: Pair  # signed by another CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _save(
    directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Pair:
    pair = Pair(directory / f"{stem}.pem", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pair.key.chmod(0o600)
    return pair


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _ca(directory: Path, stem: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(f"simcal test {stem}"))
        .issuer_name(_name(f"simcal test {stem}"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    _save(directory, stem, key, cert)
    return key, cert


def _leaf(
    directory: Path,
    stem: str,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    usages: list[x509.ObjectIdentifier],
) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
    cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(f"simcal {stem}"))
        .issuer_name(issuer[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuer[0], hashes.SHA256())
    )
    return _save(directory, stem, key, cert)


def generate_certificates(directory: Path) -> Certificates:
    """A CA, a cluster and a client certificate it signs, and a rogue one from another CA."""
    server_and_client = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ca = _ca(directory, "ca")
    rogue_ca = _ca(directory, "rogue-ca")
    return Certificates(
        ca=directory / "ca.pem",
        cluster=_leaf(directory, "cluster", ca, server_and_client),
        client=_leaf(directory, "client", ca, [ExtendedKeyUsageOID.CLIENT_AUTH]),
        rogue=_leaf(directory, "rogue", rogue_ca, [ExtendedKeyUsageOID.CLIENT_AUTH]),
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return generate_certificates(tmp_path_factory.mktemp("tls"))


def _tls_args(ca: Path, pair: Pair) -> list[str]:
    return ["--tls-ca-file", str(ca), "--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


@pytest.fixture(scope="module")
def tls_cluster(
    certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Proc, Path]]:
    """``dask scheduler --protocol tls`` and two TLS ``dask worker`` processes on 127.0.0.1."""
    logs = tmp_path_factory.mktemp("tls-cluster")
    tls = _tls_args(certs.ca, certs.cluster)
    scheduler = start(
        "scheduler",
        [DASK, "scheduler", "--protocol", "tls", "--host", HOST, "--port", "0",
         "--no-dashboard", *tls],
        logs,
    )  # fmt: skip
    with stopping(scheduler) as procs:
        # Port 0: the scheduler picks a free port itself and logs it.
        wait_until(lambda: scheduler.says("Scheduler at:"), 90, "the scheduler")
        port = int(re.search(r"Scheduler at:\s+tls://[\d.]+:(\d+)", scheduler.output())[1])
        assert _listening(port)
        address = f"tls://{HOST}:{port}"
        procs.append(
            start(
                "workers",
                [
                    DASK,
                    "worker",
                    address,
                    "--host",
                    HOST,
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "2",
                    "--memory-limit",
                    "0",
                    "--no-dashboard",
                    *tls,
                ],
                logs,
            )
        )
        yield address, scheduler, logs


def test_calibration_runs_over_tls_with_an_external_scheduler(
    certs: Certificates, tls_cluster: tuple[str, Proc, Path], tmp_path: Path
) -> None:
    address, _, _ = tls_cluster
    config = write_config(tmp_path, max_trials=MAX_TRIALS, replicates=2)
    summary = tmp_path / "summary.json"
    args = ["--scheduler", address, "--min-workers", "2", "--summary", str(summary)]
    driver = simcal_run(config, tmp_path, *args, *_tls_args(certs.ca, certs.client))
    with stopping(driver):
        status = driver.wait(240)
    output = driver.output()
    assert status == 0, output[-4000:]
    assert f"connected to scheduler {address}" in output
    result = json.loads(summary.read_text())
    assert result["n_completed"] == MAX_TRIALS and result["workers"] == 2


def test_calibration_runs_over_tls_on_a_local_cluster(certs: Certificates, tmp_path: Path) -> None:
    config = write_config(tmp_path, max_trials=MAX_TRIALS, replicates=2)
    summary = tmp_path / "summary.json"
    args = ["--workers", "2", "--summary", str(summary), *_tls_args(certs.ca, certs.cluster)]
    driver = simcal_run(config, tmp_path, *args)
    with stopping(driver):
        status = driver.wait(240)
    output = driver.output()
    assert status == 0, output[-4000:]
    assert f"connected to scheduler tls://{HOST}:" in output
    assert json.loads(summary.read_text())["n_completed"] == MAX_TRIALS


def _refused(address: str, security: Security | None) -> BaseException:
    """The error of a ``distributed.Client`` that must not get in."""
    try:
        with Client(address, timeout=10, security=security) as client:
            client.scheduler_info()
    except Exception as error:
        return error
    raise AssertionError(f"{address} let in a client with security={security!r}")


def test_clients_without_a_valid_certificate_are_refused(
    certs: Certificates, tls_cluster: tuple[str, Proc, Path]
) -> None:
    address, scheduler, _ = tls_cluster
    port = int(address.rsplit(":", 1)[1])

    # A plain client, no TLS at all.
    assert isinstance(_refused(f"tcp://{HOST}:{port}", None), OSError | TimeoutError)

    # TLS that trusts the CA but presents no certificate: the handshake is refused.
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs.ca))
    context.check_hostname = False

    async def no_certificate() -> None:
        comm = await connect(address, timeout=10, ssl_context=context)
        await comm.write({"op": "identity"})
        await comm.read()

    with pytest.raises(OSError):
        asyncio.run(no_certificate())

    # A certificate signed by another CA.
    rogue = Security(
        tls_ca_file=str(certs.ca),
        tls_client_cert=str(certs.rogue.cert),
        tls_client_key=str(certs.rogue.key),
        require_encryption=True,
    )
    assert isinstance(_refused(address, rogue), OSError | TimeoutError)

    # The scheduler itself says why it refused.
    # Both refusals are logged as the scheduler gets to them: wait for each, not the first.
    reasons = (
        "TLS handshake failed", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED"
    )
    wait_until(lambda: all(r in scheduler.output() for r in reasons), 60, f"{reasons} logged")

    # The right client certificate does get in (the same process, a moment later).
    good = Security(
        tls_ca_file=str(certs.ca),
        tls_client_cert=str(certs.client.cert),
        tls_client_key=str(certs.client.key),
        require_encryption=True,
    )
    with Client(address, timeout=30, security=good) as client:
        assert client.submit(sum, [1, 2], pure=False).result(timeout=60) == 3


def test_simcal_run_with_a_rogue_certificate_fails_clearly(
    certs: Certificates, tls_cluster: tuple[str, Proc, Path], tmp_path: Path
) -> None:
    address, _, _ = tls_cluster
    config = write_config(tmp_path, max_trials=2)
    args = ["--scheduler", address, "--connect-timeout", "10"]
    driver = simcal_run(config, tmp_path, *args, *_tls_args(certs.ca, certs.rogue))
    with stopping(driver):
        status = driver.wait(120)
    output = driver.output()
    assert status == 1, output[-3000:]
    assert f"simcal: error: cannot connect to scheduler {address}" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("scheduler", "tls", "message"),
    [
        ("tls://127.0.0.1:1", False, "a tls:// scheduler needs --tls-ca-file"),
        ("tcp://127.0.0.1:1", True, "TLS options given, but the address is not tls://"),
    ],
)
def test_tls_options_and_scheduler_scheme_must_agree(
    certs: Certificates, tmp_path: Path, scheduler: str, tls: bool, message: str
) -> None:
    config = write_config(tmp_path, max_trials=2)
    args = ["--scheduler", scheduler, *(_tls_args(certs.ca, certs.client) if tls else [])]
    driver = simcal_run(config, tmp_path, *args)
    with stopping(driver):
        status = driver.wait(120)
    output = driver.output()
    assert status == 2, output[-3000:]
    assert message in output and "Traceback" not in output


# -- the Helm chart's tls.enabled, its commands run here -------------------------------------

CHART_TRIALS = 6
CHART_VALUES: dict[str, Any] = {
    "tls": {"enabled": True, "existingSecret": "simcal-tls"},
    "workers": {"replicas": 2},
    "calibration": {
        "study": "chart-tls",
        "model": "simcal.models.synthetic:simulate",
        "parameters": {"beta": None, "gamma": None, "x": {"low": 0.0, "high": 1.0}},
        "replicates": 2,
        "seed": 3,
        "targets": [{"name": "y", "observed": "simcal.models.synthetic:observed"}],
        "max_trials": CHART_TRIALS,
    },
    "driver": {"metricsLinger": 0},
}
PORT_OPTIONS = ("--port", "--dashboard-address", "--metrics-port")


def _local_container(
    name: str,
    pod: dict[str, Any],
    root: Path,
    secrets: dict[str, dict[str, bytes]],
    config_maps: dict[str, dict[str, str]],
    addresses: dict[str, str],
) -> tuple[list[str], dict[str, str]]:
    """A rendered pod's container as argv and env here: mounts are temp dirs filled from the
    Secret/ConfigMap, in-cluster addresses and container ports are 127.0.0.1 ones."""
    (container,) = pod["containers"]
    local_paths = mount_rewriter(local_mounts(name, pod, root, config_maps, secrets))

    def here(text: str) -> str:
        for remote, local in addresses.items():
            text = text.replace(remote, local)
        return local_paths(text)

    env = {e["name"]: here(e["value"]) for e in container.get("env", []) if "value" in e}
    args = [here(expand_k8s_vars(arg, env)) for arg in container["args"]]
    for i, option in enumerate(args[:-1]):
        if option in PORT_OPTIONS and option != "--port":
            args[i + 1] = "0" if option == "--metrics-port" else f"{HOST}:0"
    if args[0] == "dask":
        args += ["--host", HOST]
    elif args[0] == "simcal":
        args += ["--metrics-host", HOST]
    return args, {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_chart_with_tls_enabled_runs_a_calibration_and_its_helm_test(
    certs: Certificates, tmp_path: Path
) -> None:
    """The pods of ``--set tls.enabled=true`` (scheduler, workers, driver, helm test), their
    args and env as rendered, the Secret's files from the certificates made here."""
    objects = render(CHART_VALUES, name="tlsrel", namespace="ns")
    cluster = find(objects, "DaskCluster")
    name, spec = cluster["metadata"]["name"], cluster["spec"]
    secret = {
        "ca.crt": certs.ca.read_bytes(),
        "tls.crt": certs.cluster.cert.read_bytes(),
        "tls.key": certs.cluster.key.read_bytes(),
    }
    config_maps = {c["metadata"]["name"]: c["data"] for c in objects if c["kind"] == "ConfigMap"}
    addresses: dict[str, str] = {}  # in-cluster -> here, once the scheduler has its ports

    def local(label: str, pod: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        return _local_container(
            label, pod, tmp_path / "mounts", {"simcal-tls": secret}, config_maps, addresses
        )

    logs = tmp_path / "logs"
    logs.mkdir()
    with stopping() as procs:
        # The scheduler picks its own ports (no race with other tests for a "free" one).
        scheduler_pod = build_scheduler_deployment_spec(name, spec["scheduler"]["spec"], {}, {})
        argv, env = local("scheduler", scheduler_pod["spec"]["template"]["spec"])
        assert argv[argv.index("--protocol") + 1] == "tls"
        argv[argv.index("--port") + 1] = "0"
        argv[argv.index("--dashboard-address") + 1] = f"{HOST}:0"
        procs.append(start("scheduler", argv, logs, env=env))
        wait_until(lambda: procs[0].says("dashboard at:"), 90, "the scheduler")
        port = int(re.search(r"Scheduler at:\s+tls://[\d.]+:(\d+)", procs[0].output())[1])
        dashboard = re.search(r"dashboard at:\s+http://[\d.]+:(\d+)", procs[0].output())[1]
        addresses[f"tls://{name}-scheduler.ns.svc.cluster.local:8786"] = f"tls://{HOST}:{port}"
        addresses[f"http://{name}-scheduler.ns.svc.cluster.local:8787"] = (
            f"http://{HOST}:{dashboard}"
        )

        worker_pod = build_worker_deployment_spec(
            f"{name}-default", "ns", name, "0000000000", spec["worker"]["spec"], {}, {}
        )
        worker_argv, worker_env = local("worker", worker_pod["spec"]["template"]["spec"])
        assert worker_argv[2] == f"tls://{HOST}:{port}"  # not the operator's tcp:// address
        driver_argv, driver_env = local("driver", find(objects, "Job")["spec"]["template"]["spec"])
        assert driver_argv[driver_argv.index("--scheduler") + 1] == f"tls://{HOST}:{port}"
        driver_argv[driver_argv.index("--connect-timeout") + 1] = "120"
        driver_argv += ["--summary", str(tmp_path / "summary.json")]
        test_argv, test_env = local("test", find(objects, "Pod")["spec"])

        for index in range(2):
            argv = [a.replace("0000000000", f"{index:010d}") for a in worker_argv]
            procs.append(start(f"worker-{index}", argv, logs, env=worker_env))
        driver = start("driver", driver_argv, logs, env=driver_env, cwd=tmp_path)
        procs.append(driver)
        assert driver.wait(300) == 0, driver.output()[-4000:] + procs[0].output()[-2000:]

        # `simcal submit` against this release (its driver template from `helm template`
        # output): the submitted Job's pod talks TLS with the Secret's files, like the chart's.
        rendered = tmp_path / "rendered.yaml"
        rendered.write_text(yaml.safe_dump_all(objects), encoding="utf-8")
        submitted_config = tmp_path / "submitted" / "calibration.yaml"
        submitted_config.parent.mkdir()
        calibration = {**CHART_VALUES["calibration"], "study": "submitted-over-tls"}
        calibration["parameters"] = {  # without helm's nulls (they drop the chart defaults)
            k: v for k, v in calibration["parameters"].items() if v is not None
        }
        submitted_config.write_text(yaml.safe_dump(calibration), encoding="utf-8")
        submit = run_simcal(
            "submit", "--dry-run", "--release", "tlsrel", "--namespace", "ns",
            "--template", str(rendered), "--config", str(submitted_config),
        )
        assert submit.returncode == 0, submit.stderr
        job_config_map, job = yaml.safe_load_all(submit.stdout)
        config_maps[job_config_map["metadata"]["name"]] = job_config_map["data"]
        submitted_argv, submitted_env = local("submitted", job["spec"]["template"]["spec"])
        assert submitted_argv[submitted_argv.index("--scheduler") + 1] == f"tls://{HOST}:{port}"
        submitted_argv[submitted_argv.index("--connect-timeout") + 1] = "120"
        submitted = start("submitted", submitted_argv, logs, env=submitted_env, cwd=tmp_path)
        procs.append(submitted)
        assert submitted.wait(300) == 0, submitted.output()[-4000:]
        assert f"connected to scheduler tls://{HOST}:{port}" in submitted.output()
        assert f'"n_completed": {CHART_TRIALS}' in submitted.output()

        helm_test = start("helm-test", test_argv, logs, env=test_env)
        procs.append(helm_test)
        assert helm_test.wait(120) == 0, helm_test.output()[-3000:]
    assert "2 workers joined (expected 2)" in helm_test.output()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_completed"] == CHART_TRIALS and summary["workers"] == 2
    assert f"connected to scheduler tls://{HOST}:{port}" in driver.output()
    # Every pod presented a valid certificate.
    refused = ("CERTIFICATE_VERIFY_FAILED", "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    assert not any(reason in procs[0].output() for reason in refused), procs[0].output()[-3000:]
