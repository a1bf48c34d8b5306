"""The manager in the cloud, its host side: the config fields it reads, the bundle and
user data that set it up, and ``scripts/manager_setup.sh`` run for real (test mode)."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from fleet import bootstrap
from fleet.aws_config import ConfigError, config_from_dict
from fleet.manager_host import render_manager_user_data

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
    import json
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
    assert {"fleet/__main__.py", "fleet/aws_main.py", "server/__main__.py",
            "scripts/manager_setup.sh", "scripts/remote_setup.sh", "requirements.txt"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert setup_mode & 0o111
    packages = {line.split(">")[0].split("=")[0].split("<")[0].strip()
                for line in requirements.splitlines() if line.strip()}
    assert packages == set(bootstrap.MANAGER_PACKAGES)
    # The worker bundle is unchanged by the refactoring into one tar helper.
    with tarfile.open(fileobj=io.BytesIO(bootstrap.build_bundle())) as tar:
        assert not any(n.startswith("fleet/") for n in tar.getnames())


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


