"""The manager in the cloud, its host side: the config fields it reads, the bundle and
user data that set it up, and ``scripts/manager_setup.sh`` run for real (test mode)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers_manager
import paramiko
import pytest
from conftest import free_port
from helpers_aws import moto_server
from helpers_manager import (
    ADMIN_TOKEN,
    REGION,
    get,
    moto_fleet_config,
    pinned_context,
    put_admin_token,
    stop_pid_file,
)

from fleet.aws import ssh_bootstrap as bootstrap
from fleet.aws.config import ConfigError, config_from_dict
from fleet.aws.manager_host import FETCH_SCRIPT, render_manager_user_data

MINIMAL: dict[str, Any] = {
    "name": "mgr", "region": "eu-west-1", "vpc_id": "vpc-1", "subnets": ["subnet-1"],
    "bucket": "imgf-mgr-bucket", "alb_security_group": "sg-alb",
    "worker_security_group": "sg-w", "key_name": "imgf-mgr", "key_file": "/k/imgf-mgr",
    "role_name": "r", "instance_profile_name": "p", "instance_profile_arn": "arn:p",
    "target_group_arn": "arn:tg", "load_balancer_arn": "arn:lb",
    "load_balancer_dns": "lb.example", "listener_arn": "arn:l", "ami": "ami-1",
    "instance_types": ["t3.small"],
}


# ------------------------------------------------------------------------- config

def test_new_manager_fields_default_to_todays_behaviour() -> None:
    config = config_from_dict(dict(MINIMAL))
    assert (config.admin_token_parameter, config.admin_tls, config.manage_ssh_key,
            config.state_dir, config.manager_security_group) == (None, False, False, None,
                                                                 None)
    again = config_from_dict({**dataclasses.asdict(config), "subnets": ["subnet-1"],
                              "instance_types": ["t3.small"]})
    assert again == config


def test_manager_fields_round_trip_through_the_file_format() -> None:
    config = config_from_dict({**MINIMAL, "admin_token_parameter": "/imagefleet/mgr/admin",
                               "admin_tls": True, "manage_ssh_key": True,
                               "state_dir": "/var/lib/imagefleet-manager",
                               "manager_security_group": "sg-mgr"})
    assert config_from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize(("changes", "message"), [
    ({"admin_tls": "yes"}, "'admin_tls' must be true or false"),
    ({"manage_ssh_key": 1}, "'manage_ssh_key' must be true or false"),
    ({"admin_token_parameter": "admin token"}, "'admin_token_parameter' must be an SSM"),
    ({"admin_token_parameter": ""}, "'admin_token_parameter' must be a non-empty string"),
    ({"state_dir": "var/lib/x"}, "'state_dir' must be an absolute path"),
    ({"manage_ssh_key": True}, "'manage_ssh_key' needs 'state_dir'"),
    ({"manager_security_group": 7}, "'manager_security_group' must be a non-empty string"),
])
def test_bad_manager_fields_are_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**MINIMAL, **changes})


# ------------------------------------------------------------------ bundle, user data

def test_manager_bundle_holds_the_manager_and_what_it_bootstraps_workers_with() -> None:
    first, second = bootstrap.build_manager_bundle(), bootstrap.build_manager_bundle()
    assert first == second  # reproducible: same code, same bytes
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        names = set(tar.getnames())
        requirements = tar.extractfile("manager-requirements.txt").read().decode()
        setup_mode = tar.getmember("scripts/manager_setup.sh").mode
        wheels = [n for n in names if n.endswith(".whl")]
        assert len(wheels) == 1, names  # exactly one wheel
        wheel_bytes = tar.extractfile(wheels[0]).read()
    # The project's code travels only inside the wheel.
    assert names == {*wheels, "manager-requirements.txt", "requirements.txt",
                     "scripts/manager_setup.sh", "scripts/setup_common.sh"}
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as wheel:
        entries = wheel.infolist()
        inside = {e.filename for e in entries}
    # The manager, the server, and the set-up scripts (package data) it bootstraps
    # workers with.
    assert {"fleet/__main__.py", "fleet/aws/main.py", "fleet/aws/wheel.py",
            "server/__main__.py", "scripts/manager_setup.sh", "scripts/remote_setup.sh",
            "scripts/setup_common.sh"} <= inside
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in inside)
    assert {e.date_time for e in entries} == {(1980, 1, 1, 0, 0, 0)}
    assert setup_mode & 0o111
    packages = {line.split(">")[0].split("=")[0].split("<")[0].strip()
                for line in requirements.splitlines() if line.strip()}
    assert packages == set(bootstrap.MANAGER_PACKAGES)
    # The workers get the same wheel, and no fleet/ sources beside it.
    with tarfile.open(fileobj=io.BytesIO(bootstrap.build_bundle())) as tar:
        assert not any(n.startswith("fleet/") for n in tar.getnames())
        assert tar.extractfile(wheels[0]).read() == wheel_bytes


def test_manager_user_data_fetches_with_the_instance_role_and_is_valid_bash(
        tmp_path: Path) -> None:
    script = render_manager_user_data(bucket="imgf-mgr-bucket", region="eu-west-1",
                                      bundle_key="manager/bundle.tar.gz",
                                      config_key="manager/fleet.json")
    path = tmp_path / "user-data.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert script.startswith("#!/bin/bash\n")
    assert "apt-get install -y -q python3-venv python3-boto3" in script
    assert "imgf-mgr-bucket eu-west-1 manager/bundle.tar.gz manager/fleet.json" in script
    assert "bash scripts/manager_setup.sh --source . --config fleet.json" in script
    # No presigned URL, no credential: the ASG may replace the manager months later.
    assert "X-Amz-" not in script and "https://" not in script
    for bad in ({"bucket": "Bad_Bucket"}, {"region": "eu-west-1; reboot"},
                {"config_key": "a b"}):
        args = {"bucket": "imgf-mgr-bucket", "region": "eu-west-1",
                "bundle_key": "b.tgz", "config_key": "c.json", **bad}
        with pytest.raises(ValueError, match="invalid"):
            render_manager_user_data(**args)




# ---------------------------------------------------------- set-up, for real (test mode)

@pytest.fixture
def moto(fake_aws: None) -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


def _fetch_like_user_data(endpoint: str, workdir: Path, bucket: str) -> None:
    """The user data's download step, as is (boto3 honours AWS_ENDPOINT_URL)."""
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    subprocess.run([sys.executable, "-", bucket, REGION, "manager/bundle.tar.gz",
                    "manager/fleet.json"], input=FETCH_SCRIPT, text=True, cwd=workdir,
                   env=env, check=True, timeout=60, capture_output=True)


def test_manager_setup_fetches_installs_and_serves_ping_over_pinned_tls(
        moto: str, tmp_path: Path) -> None:
    """The manager host's path without root or systemd: the bundle and config lie in S3
    (moto in server mode); the user data's fetch step downloads them; manager_setup.sh
    --no-systemd installs the code and starts ``python -m fleet run``, which reads its
    admin token from SSM, makes its SSH key, serves HTTPS with a certificate made in
    memory, and answers /fleet/ping. Everything it started is stopped by PID."""
    parameter = "/imagefleet/mgr/admin-token"
    put_admin_token(moto, parameter)
    state = tmp_path / "state"
    config = moto_fleet_config(
        moto, "mgr", admin_host="0.0.0.0", admin_port=free_port(), admin_tls=True,
        admin_token_parameter=parameter, manage_ssh_key=True, state_dir=str(state))
    s3 = helpers_manager.client("s3", moto)
    s3.put_object(Bucket=config["bucket"], Key="manager/bundle.tar.gz",
                  Body=bootstrap.build_manager_bundle())
    s3.put_object(Bucket=config["bucket"], Key="manager/fleet.json",
                  Body=json.dumps(config).encode())
    workdir = tmp_path / "boot"
    workdir.mkdir()
    _fetch_like_user_data(moto, workdir, config["bucket"])
    assert stat.S_IMODE((workdir / "fleet.json").stat().st_mode) == 0o600
    with tarfile.open(workdir / "bundle.tar.gz") as tar:
        tar.extractall(workdir, filter="data")

    prefix = tmp_path / "prefix"
    try:
        result = subprocess.run(
            ["bash", "scripts/manager_setup.sh", "--no-systemd", "--source", ".",
             "--config", "fleet.json", "--prefix", str(prefix), "--venv", sys.prefix,
             "--region", REGION, "--health-timeout", "60"],
            cwd=workdir, capture_output=True, text=True, timeout=120, check=False)
        log = (prefix / "manager.log").read_text() if (prefix / "manager.log").exists() else ""
        assert result.returncode == 0, result.stderr + log
        assert "answering: https://127.0.0.1:" in result.stdout
        app = prefix / "app"
        assert (app / "fleet" / "__main__.py").exists()
        assert (app / "scripts" / "remote_setup.sh").exists()  # from the wheel
        # The wheel is kept with the code; the workers' bundles, built there as the
        # manager builds them, carry it as is (no sources, no wheel build on the host).
        bundle_wheel = next(workdir.glob("imagefleet-*-py3-none-any.whl"))
        kept = list(app.glob("imagefleet-*-py3-none-any.whl"))
        assert [w.read_bytes() for w in kept] == [bundle_wheel.read_bytes()]
        assert not (app / "pyproject.toml").exists()
        with tarfile.open(fileobj=io.BytesIO(bootstrap.build_bundle(root=app))) as tar:
            assert tar.extractfile(bundle_wheel.name).read() == bundle_wheel.read_bytes()
            assert "scripts/remote_setup.sh" in tar.getnames()

        pem = (state / "admin-cert.pem").read_text()
        context = pinned_context(pem)
        base = f"https://127.0.0.1:{config['admin_port']}/fleet"
        assert get(f"{base}/ping", context=context) == (200, {"status": "ok"})
        status, body = get(base, context=context)  # loopback, but off-loopback serving
        assert status == 401 and body["error"]["code"] == "unauthorized"
        status, body = get(base, context=context, token="wrong-token-123")
        assert status == 401
        status, body = get(base, context=context, token=ADMIN_TOKEN)
        assert status == 200 and body["name"] == "mgr" and body["provider"] == "aws"
        # The key it made: private in the 0700 state folder, public half in EC2.
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        key_file = state / "imgf-mgr_ed25519"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        pairs = helpers_manager.client("ec2", moto).describe_key_pairs(
            KeyNames=["imgf-mgr"], IncludePublicKey=True)["KeyPairs"]
        ours = paramiko.PKey.from_path(str(key_file))  # paramiko loads what it wrote
        assert pairs[0]["PublicKey"].split()[:2] == [ours.get_name(), ours.get_base64()]
        # The certificate is the one served, and only its public half is on disk.
        assert "PRIVATE KEY" not in pem and not list(state.glob("*key*.pem"))
    finally:
        stop_pid_file(prefix / "manager.pid")


def test_manager_setup_reports_a_manager_that_cannot_start(moto: str, tmp_path: Path) -> None:
    """Off loopback with no token anywhere: the manager refuses to start, and the set-up
    script says so with the manager's own words."""
    config = moto_fleet_config(moto, "open", admin_host="0.0.0.0", admin_port=free_port())
    source = tmp_path / "bundle"
    source.mkdir()
    with tarfile.open(fileobj=io.BytesIO(bootstrap.build_manager_bundle())) as tar:
        tar.extractall(source, filter="data")
    (tmp_path / "fleet.json").write_text(json.dumps(config))
    prefix = tmp_path / "prefix"
    env = {k: v for k, v in os.environ.items() if k != "IMAGEFLEET_ADMIN_TOKEN"}
    try:
        result = subprocess.run(
            ["bash", str(source / "scripts" / "manager_setup.sh"), "--no-systemd",
             "--source", str(source), "--config", str(tmp_path / "fleet.json"),
             "--prefix", str(prefix), "--venv", sys.prefix, "--health-timeout", "60"],
            capture_output=True, text=True, timeout=120, check=False, env=env)
    finally:
        stop_pid_file(prefix / "manager.pid")
    assert result.returncode == 1
    assert "the manager exited before answering" in result.stderr
    assert "needs a token" in result.stderr and "admin_token_parameter" in result.stderr


def test_manager_setup_rejects_bad_arguments(tmp_path: Path) -> None:
    script = bootstrap.PROJECT_ROOT / "scripts" / "manager_setup.sh"
    result = subprocess.run(["bash", str(script), "--no-systemd", "--source", "."],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2 and "--config FILE is required" in result.stderr
    result = subprocess.run(["bash", str(script), "--colour", "blue"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2 and "unknown argument '--colour'" in result.stderr


def test_the_systemd_unit_runs_the_manager_unprivileged_and_hardened(tmp_path: Path) -> None:
    """--print-unit shows what production mode installs, without root."""
    source = tmp_path / "bundle"
    source.mkdir()
    with tarfile.open(fileobj=io.BytesIO(bootstrap.build_manager_bundle())) as tar:
        tar.extractall(source, filter="data")
    config = tmp_path / "fleet.json"
    config.write_text(json.dumps({**MINIMAL, "state_dir": "/var/lib/imagefleet-manager",
                                  "manage_ssh_key": True}))
    script = source / "scripts" / "manager_setup.sh"
    result = subprocess.run(
        ["bash", str(script), "--print-unit", "--source", str(source),
         "--config", str(config), "--region", REGION, "--python", sys.executable],
        capture_output=True, text=True, timeout=30, check=True)
    lines = set(result.stdout.splitlines())
    assert {"User=imagefleet-manager", "Restart=always", "NoNewPrivileges=yes",
            "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
            "StateDirectory=imagefleet-manager", "StateDirectoryMode=0700",
            "CapabilityBoundingSet=", "UMask=0077",
            "ExecStart=/opt/imagefleet-manager/venv/bin/python -m fleet run "
            "--config /etc/imagefleet/manager.json"} <= lines
    # A state folder systemd cannot manage is refused, naming what is allowed.
    config.write_text(json.dumps({**MINIMAL, "state_dir": "/srv/manager"}))
    result = subprocess.run(
        ["bash", str(script), "--print-unit", "--source", str(source),
         "--config", str(config), "--python", sys.executable],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1 and "state_dir must be /var/lib/NAME" in result.stderr
